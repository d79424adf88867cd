//! [mount] end to end through a real FUSE mount of the `lazysnap` binary: every test image, in
//! every compression and archive form, equals the reference umoci unpacks, field for field;
//! random reads across span boundaries; concurrent readers; unmount, signals and stale mounts.

mod common;

use common::{lazysnap, ok, Mounted};

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// FUSE plus umoci, which makes the references.
fn can_mount() -> bool {
    common::can_mount()
        && common::require(common::have_cmd("umoci"), "umoci (scripts/install-deps.sh)")
}

/// `tar -C src -cf tar .` with root as owner.
fn tar_dir(src: &Path, tar: &Path, extra: &[&str]) {
    let st = Command::new("tar")
        .args(["--owner=0", "--group=0"])
        .args(extra)
        .arg("-C")
        .arg(src)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar of {}", src.display());
}

/// An OCI layout at `layout` made by scripts/mkimage.py from `layers` (`TAR[:COMP]`).
fn mkimage(layout: &Path, layers: &[String]) {
    let out = Command::new("python3")
        .arg(common::scripts_dir().join("mkimage.py"))
        .arg(layout)
        .args(layers)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn import(root: &Path, src: &Path, name: &str) {
    ok(root, &["import", src.to_str().unwrap(), "--name", name]);
}

fn check_equal(root: &Path, image: &str, layout: &Path, mnt: &Path) {
    let reference = common::reference_tree(layout, common::TAG);
    let _m = Mounted::new(root, image, mnt);
    common::assert_trees_equal(mnt, &reference);
}

#[test]
fn debian_images_mount_equal_to_umoci_unpack() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for src in common::DEBIAN_IMAGES {
        import(&root, &data.join(src), src);
        check_equal(
            &root,
            src,
            &data.join(src),
            &tmp.path().join(format!("mnt-{src}")),
        );
    }
    // The archive forms give the same tree.
    for src in ["debian-gzip.oci.tar", "debian-docker.tar"] {
        import(&root, &data.join(src), src);
        check_equal(
            &root,
            src,
            &data.join("debian-gzip"),
            &tmp.path().join("mnt-archive"),
        );
    }
}

#[test]
fn edge_case_images_mount_equal_to_umoci_unpack() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for src in common::EDGE_IMAGES {
        import(&root, &data.join(src), src);
        check_equal(
            &root,
            src,
            &data.join(src),
            &tmp.path().join(format!("mnt-{src}")),
        );
    }
}

#[test]
fn runs_programs_from_the_image() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    import(&root, &data.join("debian-zstd"), "deb");
    let mnt = tmp.path().join("mnt");
    let _m = Mounted::new(&root, "deb", &mnt);
    let out = Command::new("chroot")
        .arg(&mnt)
        .args([
            "/usr/bin/python3",
            "-c",
            "import json,sqlite3; print(json.dumps([sqlite3.sqlite_version_info[0]]))",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[3]");
    let out = Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/bash", "-c", "ls /usr/bin | wc -l"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let n: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(n > 50, "{n}");
}

/// Every regular file of `dir` larger than `min`, with its size.
fn big_files(dir: &Path, min: u64) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let md = e.path().symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && md.len() >= min {
                out.push((e.path(), md.len()));
            }
        }
    }
    out.sort();
    out
}

fn read_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read(&mut buf[got..]).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    buf
}

#[test]
fn random_reads_across_spans_and_concurrent_readers_match_the_reference() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for src in ["edge-gzip", "edge-zstd", "edge-mixed"] {
        import(&root, &data.join(src), src);
        let reference = common::reference_tree(&data.join(src), common::TAG);
        let mnt = tmp.path().join(format!("mnt-{src}"));
        let _m = Mounted::new(&root, src, &mnt);
        let files = big_files(&reference, 1 << 20);
        assert!(!files.is_empty(), "the edge image has files of several MiB");
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for (path, size) in &files {
            let rel = path.strip_prefix(&reference).unwrap();
            for _ in 0..20 {
                let off = rng.random_range(0..*size);
                let len = rng.random_range(1..=(9 << 20));
                assert!(
                    read_range(&mnt.join(rel), off, len) == read_range(path, off, len),
                    "{src}: {} at {off}+{len}",
                    rel.display()
                );
            }
        }
        // Eight threads reading every big file at once, each from its own offset.
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let files = &files;
                let mnt = &mnt;
                let reference = &reference;
                s.spawn(move || {
                    for (path, size) in files {
                        let rel = path.strip_prefix(reference).unwrap();
                        let off = (size / 8) * t;
                        assert!(
                            read_range(&mnt.join(rel), off, 3 << 20)
                                == read_range(path, off, 3 << 20)
                        );
                    }
                });
            }
        });
    }
}

#[test]
fn unmount_sigterm_and_stale_mounts() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    import(&root, &data.join("edge-none"), "edge");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();

    // Mounting twice at one place is refused.
    let m = Mounted::new(&root, "edge", &mnt);
    let out = lazysnap(&root, &["mount", "edge", mnt.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a mount point"));
    drop(m);
    assert!(!is_mounted(&mnt));
    assert!(!lazysnap(&root, &["umount", mnt.to_str().unwrap()])
        .status
        .success());

    // SIGTERM to a foreground daemon unmounts cleanly.
    let mut child = Command::new(common::lazysnap_bin())
        .arg("--root")
        .arg(&root)
        .args(["mount", "--foreground", "edge", mnt.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(|| is_mounted(&mnt));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mnt));

    // A killed daemon without a keeper (tests/keeper.rs: with one, a new daemon takes over)
    // leaves a stale mount; the next mount cleans it and says so.
    let mut child = Command::new(common::lazysnap_bin())
        .env("LAZYSNAP_FUSE_KEEPER", "0")
        .arg("--root")
        .arg(&root)
        .args(["mount", "--foreground", "edge", mnt.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(|| is_mounted(&mnt));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(is_mounted(&mnt), "the dead daemon's mount stays behind");
    let err = fs::metadata(mnt.join("base")).err();
    assert!(err.is_some() || fs::read_dir(&mnt).is_err());
    let out = lazysnap(&root, &["mount", "edge", mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale"));
    assert!(fs::read_dir(&mnt).unwrap().count() > 0);
    ok(&root, &["umount", mnt.to_str().unwrap()]);
}

fn is_mounted(dir: &Path) -> bool {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

fn wait_until(f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mount_of_unknown_image_names_what_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = lazysnap(&root, &["mount", "nope", mnt.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope") && err.contains("images: none"),
        "{err}"
    );
    let _ = fs::metadata(&mnt).unwrap().ino();
}

/// A 128-layer image (each layer adds a file, rewrites one, deletes one of the layer before)
/// mounts equal to umoci's unpack even when the caller's soft limit on open files is 64: a
/// mount holds every layer's blob open, so lazysnap lifts the soft limit to the hard one.
#[test]
fn image_of_128_layers_under_a_low_open_file_limit() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut layers = Vec::new();
    for i in 1..=128u32 {
        let src = tmp.path().join(format!("src{i}"));
        fs::create_dir_all(src.join(format!("dir{}", i % 5))).unwrap();
        fs::write(
            src.join(format!("dir{}/file{i}", i % 5)),
            format!("layer {i}\n"),
        )
        .unwrap();
        fs::write(src.join("shared"), format!("version {i}\n")).unwrap();
        if i > 1 {
            let prev = i - 1;
            fs::create_dir_all(src.join(format!("dir{}", prev % 5))).unwrap();
            fs::write(src.join(format!("dir{}/.wh.file{prev}", prev % 5)), b"").unwrap();
        }
        let tar = tmp.path().join(format!("layer{i}.tar"));
        tar_dir(&src, &tar, &["--mtime=@1700000000"]);
        // Mix the compressions along the stack.
        let comp = ["gzip", "zstd", "none"][i as usize % 3];
        layers.push(format!("{}:{comp}", tar.display()));
    }
    let layout = tmp.path().join("deep");
    mkimage(&layout, &layers);
    let root = tmp.path().join("root");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let reference = common::reference_tree(&layout, common::TAG);
    let lz = common::lazysnap_bin();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 64 && {lz} --root {root} import {layout} --name deep && \
             {lz} --root {root} mount deep {mnt}",
            lz = lz.display(),
            root = root.display(),
            layout = layout.display(),
            mnt = mnt.display()
        ))
        .output()
        .unwrap();
    let _m = Mounted {
        root: root.clone(),
        dir: mnt.clone(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_trees_equal(&mnt, &reference);
    assert_eq!(
        fs::read_to_string(mnt.join("shared")).unwrap(),
        "version 128\n"
    );
}

/// Symlinks in a layer that point out of the root filesystem (absolute and `../..`) are data:
/// copy-up, metadata changes on the link itself, renames, removal and commit act on the link in
/// the upper directory and never on what it points to on the host.
#[test]
fn symlinks_out_of_the_rootfs_never_reach_the_host() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Host files the links point at: they must not change.
    let host = tmp.path().join("host");
    fs::create_dir_all(host.join("dir")).unwrap();
    fs::write(host.join("file"), b"host file").unwrap();
    fs::write(host.join("dir/inner"), b"host dir").unwrap();
    let snapshot = |p: &Path| {
        let out = Command::new("python3")
            .arg(common::scripts_dir().join("tree-manifest.py"))
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    let before = snapshot(&host);

    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    let abs = |p: &str| host.join(p).display().to_string();
    std::os::unix::fs::symlink(abs("file"), src.join("etc/abs-file")).unwrap();
    std::os::unix::fs::symlink(abs("dir"), src.join("etc/abs-dir")).unwrap();
    let rel = format!("../../../../../../../../..{}", abs("file"));
    std::os::unix::fs::symlink(&rel, src.join("etc/rel-file")).unwrap();
    let tar = tmp.path().join("layer.tar");
    tar_dir(&src, &tar, &[]);
    let layout = tmp.path().join("img");
    mkimage(&layout, &[tar.display().to_string()]);
    let root = tmp.path().join("root");
    import(&root, &layout, "links");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    ok(&root, &["mount", "--rw", "links", mnt.to_str().unwrap()]);
    let _m = Mounted {
        root: root.clone(),
        dir: mnt.clone(),
    };
    let sh = |script: &str| common::bash_in(&mnt, script, &[]);
    // Operations on the links themselves (copy-up of the link, never of its target).
    sh("chown -h 12:34 etc/abs-file etc/abs-dir etc/rel-file");
    sh("touch -h -d @1600000000 etc/abs-file etc/abs-dir");
    sh("setfattr -h -n trusted.lazysnap -v x etc/rel-file");
    sh("mv etc/abs-dir etc/moved-dir && ln -s /nowhere etc/new-link && rm etc/rel-file");
    ok(&root, &["commit", mnt.to_str().unwrap(), "links:2"]);
    assert_eq!(
        before,
        snapshot(&host),
        "the host files behind the links are untouched"
    );

    let out_dir = tmp.path().join("export");
    ok(&root, &["export", "links:2", out_dir.to_str().unwrap()]);
    let reference = common::reference_tree(&out_dir, "2");
    let link = |p: &str| fs::read_link(reference.join(p)).unwrap();
    assert_eq!(link("etc/abs-file"), host.join("file"));
    assert_eq!(link("etc/moved-dir"), host.join("dir"));
    assert!(
        !reference.join("etc/rel-file").exists()
            && fs::symlink_metadata(reference.join("etc/rel-file")).is_err()
    );
    let md = fs::symlink_metadata(reference.join("etc/abs-file")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mtime()), (12, 34, 1600000000));
    assert_eq!(
        before,
        snapshot(&host),
        "nor did the export and unpack touch them"
    );
}

/// `export --compression gzip` of a commit (whose own layer is zstd, on an image of zstd
/// layers) is read by Debian 12's umoci (0.4.7, which refuses zstd) directly — no conversion
/// in between — and umoci's tree equals the mount of the commit, field for field. The
/// diffIDs stay, every layer is gzip; `--compression none` imports back to the same tree.
#[test]
fn export_compression_gzip_is_unpacked_by_umoci_as_the_mount() {
    if !can_mount() || !common::require(common::have_cmd("umoci"), "umoci") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    import(&root, &common::image("debian-zstd"), "deb:1");
    let rw = tmp.path().join("rw");
    fs::create_dir_all(&rw).unwrap();
    ok(&root, &["mount", "--rw", "deb:1", rw.to_str().unwrap()]);
    {
        let _m = Mounted {
            root: root.clone(),
            dir: rw.clone(),
        };
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c"])
            .arg(
                r#"printf 'new file\n' > etc/added
                chmod 0600 etc/added && chown 7:8 etc/added
                head -c 3000000 /dev/urandom > big.bin
                ln big.bin big.link
                setfattr -n user.note -v exported etc/added
                rm -r etc/gss
                mkdir -p opt/tool/bin && touch -d @1500000000 opt/tool/bin
                printf 'x' >> etc/os-release"#,
            )
            .current_dir(&rw)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ok(&root, &["commit", rw.to_str().unwrap(), "deb:2"]);
    }
    let mnt = tmp.path().join("mnt");
    let _m = Mounted::new(&root, "deb:2", &mnt);

    let out_dir = tmp.path().join("gz");
    let printed = ok(
        &root,
        &[
            "export",
            "deb:2",
            out_dir.to_str().unwrap(),
            "--compression",
            "gzip",
        ],
    );
    assert!(printed.contains("re-compressed"), "{printed}");
    let layout_manifest = |dir: &Path| -> serde_json::Value {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let d = index["manifests"][0]["digest"].as_str().unwrap();
        let bytes = fs::read(dir.join("blobs/sha256").join(&d[7..])).unwrap();
        assert_eq!(common::sha256_of(&bytes), d[7..], "manifest digest");
        serde_json::from_slice(&bytes).unwrap()
    };
    let m = layout_manifest(&out_dir);
    for l in m["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{m:#}"
        );
        let d = l["digest"].as_str().unwrap();
        let blob = fs::read(out_dir.join("blobs/sha256").join(&d[7..])).unwrap();
        assert_eq!(common::sha256_of(&blob), d[7..]);
        assert_eq!(blob.len() as u64, l["size"].as_u64().unwrap());
    }
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&root, &["inspect", "deb:2"])).unwrap();
    let config: serde_json::Value = serde_json::from_slice(
        &fs::read(
            out_dir
                .join("blobs/sha256")
                .join(&m["config"]["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"], inspect["RootFS"],
        "diffIDs do not change"
    );

    // umoci itself, on the exported layout as it is.
    let bundle = tmp.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:2", out_dir.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let implicit = Command::new("python3")
        .arg(common::scripts_dir().join("ocitool.py"))
        .args(["implicit-dirs", out_dir.to_str().unwrap(), "2"])
        .output()
        .unwrap();
    assert!(implicit.status.success());
    let mut opts = common::CompareOptions::default();
    for l in String::from_utf8_lossy(&implicit.stdout).lines() {
        opts.ignore_mtime.insert(if l == "." {
            PathBuf::new()
        } else {
            PathBuf::from(l)
        });
    }
    let diffs = common::compare_trees_with(&mnt, &bundle.join("rootfs"), &opts);
    assert!(diffs.is_empty(), "mount vs umoci unpack: {diffs:#?}");

    // Uncompressed out, imported back: the same tree again.
    let plain = tmp.path().join("plain");
    ok(
        &root,
        &[
            "export",
            "deb:2",
            plain.to_str().unwrap(),
            "--compression",
            "none",
        ],
    );
    for l in layout_manifest(&plain)["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    }
    let root2 = tmp.path().join("root2");
    import(&root2, &plain, "back:2");
    let mnt2 = tmp.path().join("mnt2");
    let _m2 = Mounted::new(&root2, "back:2", &mnt2);
    let diffs = common::compare_trees_with(&mnt2, &mnt, &Default::default());
    assert!(
        diffs.is_empty(),
        "export none + import vs mount: {diffs:#?}"
    );
}

/// A daemon serving a read-only image holds little beyond its span cache after a read of every
/// file (#15: "at most 32 MiB beyond its span cache"). glibc's dynamic mmap threshold kept freed
/// span buffers in the workers' arenas: 82 MiB anonymous memory with an 8 MiB cache before.
#[test]
fn daemon_memory_after_reading_every_file_is_the_span_cache_and_little_more() {
    if !can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    import(&root, &data.join("debian-gzip"), "deb");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mnt_arg = mnt.to_str().unwrap();
    common::ok(&root, &["mount", "deb", mnt_arg, "--cache-size", "8M"]);
    let pids = common::lazysnap_processes(&mnt);
    assert_eq!(pids.len(), 1, "one daemon for {}", mnt.display());
    let mut bytes = 0u64;
    for e in common::entries_under(&mnt) {
        if e.1.is_file() {
            bytes += fs::read(&e.0).unwrap().len() as u64;
        }
    }
    let status = fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    let anon_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status");
    common::ok(&root, &["umount", mnt_arg]);
    eprintln!(
        "read {} MiB through the mount; daemon anonymous memory {} MiB (cache 8 MiB)",
        bytes >> 20,
        anon_kib >> 10
    );
    assert!(bytes > 50 << 20, "read only {bytes} bytes");
    assert!(
        anon_kib <= (8 + 32) << 10,
        "daemon holds {} MiB anonymous memory with an 8 MiB span cache",
        anon_kib >> 10
    );
}
