//! [containerd] Real containerd (Debian's, 1.6 here) and runc on `lazysnap serve`, through
//! scripts/containerd-env.sh: `ctr images import` + `ctr run` of the test images (a shell,
//! python3, writes), a restart of `lazysnap serve` between two runs, and the diff plugin's
//! Apply (index, don't extract) driven through gRPC the way containerd's unpacker calls it.
//!
//! Root, /dev/fuse, containerd, runc and ctr are prerequisites (CI=true: missing = failure).
//! Every environment gets its own directory and namespace; it is stopped (SIGTERM, unmount)
//! when the test ends, also on failure. Every command runs under `timeout`.

mod common;

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::containerd::{
    assert_imported_without_extraction, check, run_timeout, text, ContainerdEnv, CMD_TIMEOUT,
};
use lazysnap::service::proto::diff::diff_client::DiffClient;
use lazysnap::service::proto::diff::{ApplyRequest, DiffRequest};
use lazysnap::service::proto::snapshots::snapshots_client::SnapshotsClient;
use lazysnap::service::proto::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use lazysnap::service::proto::types;

fn prerequisites() -> bool {
    common::require(common::is_root(), "root (containerd, FUSE mounts)")
        && common::require(common::have_dev_fuse(), "/dev/fuse")
        && common::require(
            common::have_cmd("containerd"),
            "containerd (apt-get install containerd)",
        )
        && common::require(common::have_cmd("runc"), "runc (apt-get install runc)")
        && common::require(common::have_cmd("ctr"), "ctr (Debian's containerd package)")
        && common::require(common::have_cmd("timeout"), "timeout (coreutils)")
}

/// A private containerd + `lazysnap serve` (scripts/containerd-env.sh) with one namespace.
struct CtrEnv {
    env: ContainerdEnv,
    ns: String,
}

impl CtrEnv {
    fn start(name: &str) -> CtrEnv {
        CtrEnv {
            env: ContainerdEnv::start("ctrd", &[]),
            ns: format!("lzs-{name}-{}", std::process::id()),
        }
    }

    fn dir(&self) -> &Path {
        &self.env.dir
    }

    fn script_ok(&self, verb: &str) -> String {
        let out = self.env.script(&[verb]);
        if !out.status.success() {
            self.env.dump_logs();
        }
        check(&format!("containerd-env.sh {verb}"), out)
    }

    fn lazysnap_socket(&self) -> PathBuf {
        self.dir().join("lazysnap.sock")
    }

    fn lazysnap_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("lazysnap.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.env.ctr(&self.ns, args)
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        self.env.ctr_ok(&self.ns, args)
    }

    /// Imports `archive` into this namespace, unpacked on lazysnap; returns the image name
    /// and the seconds it took.
    fn import(&self, archive: &Path) -> (String, f64) {
        let t = Instant::now();
        self.ctr_ok(&[
            "images",
            "import",
            "--snapshotter",
            "lazysnap",
            archive.to_str().unwrap(),
        ]);
        let secs = t.elapsed().as_secs_f64();
        let names = self.ctr_ok(&["images", "ls", "-q"]);
        let name = names
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no image after importing {}", archive.display()))
            .to_string();
        (name, secs)
    }

    /// `ctr run --rm` of `cmd` in `image`; returns stdout.
    fn run(&self, image: &str, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "lazysnap", image, id];
        args.extend_from_slice(cmd);
        self.ctr_ok(&args)
    }
}

#[test]
fn ctr_runs_a_shell_python_and_writes_on_lazysnap() {
    if !prerequisites() {
        return;
    }
    for archive in ["debian-docker.tar", "debian-gzip.oci.tar"] {
        let env = CtrEnv::start("run");
        let (image, secs) = env.import(&common::image(archive));
        eprintln!("ctr images import {archive}: {secs:.2}s -> {image}");
        assert_imported_without_extraction(env.dir(), archive);

        let out = env.run(
            &image,
            "sh",
            &["/bin/bash", "-c", "echo hello from $0; uname -s"],
        );
        assert_eq!(out, "hello from /bin/bash\nLinux\n", "{archive}");

        let out = env.run(
            &image,
            "py",
            &[
                "python3",
                "-c",
                "import sys, json; print(json.dumps([sys.version_info[0], 6*7]))",
            ],
        );
        assert_eq!(out.trim(), "[3, 42]", "{archive}");

        // Writes: new files, a changed file from the image, a removed one, a hardlink.
        let script = "set -e; mkdir -p /work/d; echo one > /work/d/a; \
            python3 -c 'open(\"/work/d/b\", \"w\").write(\"two\\n\")'; ln /work/d/a /work/d/c; \
            echo changed >> /etc/hostname; rm /etc/issue 2>/dev/null || true; \
            cat /work/d/a /work/d/b /work/d/c; tail -n1 /etc/hostname; \
            test ! -e /etc/issue && echo gone; stat -c %h /work/d/a";
        let out = env.run(&image, "writer", &["/bin/bash", "-c", script]);
        assert_eq!(out, "one\ntwo\none\nchanged\ngone\n2\n", "{archive}");

        // --rm removed the container's snapshot: the next container starts clean.
        let out = env.run(
            &image,
            "clean",
            &[
                "/bin/bash",
                "-c",
                "test -e /work && echo dirty || echo clean",
            ],
        );
        assert_eq!(out, "clean\n", "{archive}");
    }
}

#[test]
fn restart_of_lazysnap_serve_between_two_runs() {
    if !prerequisites() {
        return;
    }
    let env = CtrEnv::start("restart");
    let (image, _) = env.import(&common::image("debian-docker.tar"));
    let out = env.run(
        &image,
        "before",
        &["/bin/bash", "-c", "echo x > /root/x && cat /root/x"],
    );
    assert_eq!(out, "x\n");
    let committed_before = env.ctr_ok(&["snapshots", "--snapshotter", "lazysnap", "ls"]);

    let t = Instant::now();
    env.script_ok("restart-snapshotter");
    eprintln!(
        "lazysnap serve restarted in {:.2}s",
        t.elapsed().as_secs_f64()
    );

    // containerd's proxy client reconnects (its gRPC dialer backs off for a while after the
    // socket went away); the committed layers are still served.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let committed_after = loop {
        let out = env.ctr(&["snapshots", "--snapshotter", "lazysnap", "ls"]);
        if out.status.success() {
            break text(&out.stdout);
        }
        assert!(
            Instant::now() < deadline,
            "containerd did not reconnect to lazysnap serve: {}",
            text(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(committed_before, committed_after);
    let out = env.run(
        &image,
        "after",
        &["python3", "-c", "import os; print(os.path.exists('/root/x'), open('/etc/os-release').read().count('\\n') > 0)"],
    );
    assert_eq!(out, "False True\n");
}

/// The members of an OCI archive that are JSON (index, manifests, configs), by path.
fn oci_archive_json(archive: &Path) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().size().unwrap() > 1 << 20 {
            continue;
        }
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        if buf.first() == Some(&b'{') {
            out.insert(path, buf);
        }
    }
    out
}

fn blob_json(files: &HashMap<String, Vec<u8>>, digest: &str) -> serde_json::Value {
    let path = format!("blobs/{}", digest.replacen(':', "/", 1));
    serde_json::from_slice(files.get(&path).unwrap_or_else(|| panic!("{path} missing"))).unwrap()
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match chain.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                common::sha256_of(format!("{prev} {d}").as_bytes())
            ),
        };
        chain.push(next);
    }
    chain
}

/// containerd 1.7 and newer load `proxy_plugins` of type "diff" (1.6 panics on them, so
/// scripts/containerd-env.sh configures lazysnap-diff only there).
fn containerd_loads_proxy_diff() -> bool {
    let out = run_timeout("containerd", &["--version"], &[]);
    let v = text(&out.stdout);
    let ver = v
        .split_whitespace()
        .nth(2)
        .unwrap_or("")
        .trim_start_matches('v');
    let mut it = ver.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    major > 1 || (major == 1 && minor >= 7)
}

fn lazysnap_import_secs(archive: &Path) -> f64 {
    let root = tempfile::tempdir().unwrap();
    let bin = common::lazysnap_bin();
    let t = Instant::now();
    let out = run_timeout(
        bin.to_str().unwrap(),
        &[
            "--root",
            root.path().to_str().unwrap(),
            "import",
            archive.to_str().unwrap(),
            "--name",
            "x:1",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "lazysnap import: {}",
        text(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

/// The upper directory behind a snapshot's mounts: an overlay's `upperdir`, the bind of an
/// overlay-mode upper (no parent), or beside a FUSE mountpoint.
fn upper_of(mounts: &[types::Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    if let Some(u) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) {
        return PathBuf::from(u);
    }
    let source = Path::new(&m.source);
    if source.ends_with("upper") {
        return source.to_path_buf();
    }
    source.parent().unwrap().join("upper")
}

/// What containerd's unpacker does per layer (rootfs.applyLayers: Prepare an `extract-…` key
/// on the parent, Apply the layer blob onto its mounts through the diff service, Commit it as
/// the chain ID), with lazysnap's diff plugin as the differ and the blob in containerd's
/// content store. containerd 1.7+ routes Apply here itself (`proxy_plugins` type "diff");
/// 1.6 cannot load proxy diff plugins, so the test drives the same calls through gRPC.
#[test]
fn diff_apply_indexes_the_layer_instead_of_extracting_it() {
    if !prerequisites() {
        return;
    }
    let archive = common::image("debian-gzip.oci.tar");
    let env = CtrEnv::start("apply");
    // Content only: containerd's content store gets the blobs, nothing is unpacked.
    let t = Instant::now();
    env.ctr_ok(&["images", "import", "--no-unpack", archive.to_str().unwrap()]);
    let content_secs = t.elapsed().as_secs_f64();

    let files = oci_archive_json(&archive);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest = blob_json(&files, index["manifests"][0]["digest"].as_str().unwrap());
    let config = blob_json(&files, manifest["config"]["digest"].as_str().unwrap());
    let layers = manifest["layers"].as_array().unwrap().clone();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let chains = chain_ids(&diff_ids);
    assert_eq!(layers.len(), diff_ids.len());

    let n_layers = layers.len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ns = env.ns.clone();
    let sock = env.lazysnap_socket();
    let apply_secs = rt.block_on(async move {
        let ch = tokio::time::timeout(Duration::from_secs(30), lazysnap::service::connect(&sock))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut sn = SnapshotsClient::new(ch.clone());
        let mut diff = DiffClient::new(ch);
        let mut parent = String::new();
        let mut apply_total = Duration::ZERO;
        for (i, layer) in layers.iter().enumerate() {
            let key = format!("{ns}/{}/apply-{i} {}", 100 + 2 * i, chains[i]);
            let name = format!("{ns}/{}/{}", 101 + 2 * i, chains[i]);
            let mounts = sn
                .prepare(PrepareSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: Default::default(),
                })
                .await
                .expect("prepare")
                .into_inner()
                .mounts;
            let desc = types::Descriptor {
                media_type: layer["mediaType"].as_str().unwrap().into(),
                digest: layer["digest"].as_str().unwrap().into(),
                size: layer["size"].as_i64().unwrap(),
                annotations: Default::default(),
            };
            let t = Instant::now();
            let applied = tokio::time::timeout(
                Duration::from_secs(CMD_TIMEOUT),
                diff.apply(ApplyRequest {
                    diff: Some(desc.clone()),
                    mounts: mounts.clone(),
                    payloads: Default::default(),
                    sync_fs: false,
                }),
            )
            .await
            .expect("apply timed out")
            .expect("apply")
            .into_inner()
            .applied
            .expect("applied descriptor");
            apply_total += t.elapsed();
            assert_eq!(applied.digest, diff_ids[i], "layer {i}: the diffID");
            assert_eq!(applied.media_type, "application/vnd.oci.image.layer.v1.tar");
            assert!(
                applied.size > desc.size / 2,
                "uncompressed size {}",
                applied.size
            );
            // Nothing was extracted: the upper is empty.
            let upper = upper_of(&mounts);
            let entries: Vec<_> = std::fs::read_dir(&upper).unwrap().collect();
            assert!(
                entries.is_empty(),
                "upper {} has {} entries",
                upper.display(),
                entries.len()
            );

            sn.commit(CommitSnapshotRequest {
                snapshotter: "lazysnap".into(),
                name: name.clone(),
                key: key.clone(),
                labels: Default::default(),
            })
            .await
            .expect("commit");
            let _ = sn
                .remove(RemoveSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key,
                })
                .await;
            let info = sn
                .stat(StatSnapshotRequest {
                    snapshotter: "lazysnap".into(),
                    key: name.clone(),
                })
                .await
                .expect("stat")
                .into_inner()
                .info
                .unwrap();
            assert_eq!(info.parent, parent);
            parent = name;
        }

        // The result is a real root filesystem: run python3 from it.
        let key = format!("{ns}/999/check");
        let mounts = sn
            .prepare(PrepareSnapshotRequest {
                snapshotter: "lazysnap".into(),
                key: key.clone(),
                parent: parent.clone(),
                labels: Default::default(),
            })
            .await
            .expect("prepare on the applied chain")
            .into_inner()
            .mounts;
        // Mounted as containerd mounts a container's rootfs.
        let as_json = serde_json::json!([{
            "type": mounts[0].r#type,
            "source": mounts[0].source,
            "options": mounts[0].options,
        }]);
        let rootfs = tempfile::tempdir().unwrap();
        let mounted = common::SnapshotMount::new(&as_json, &rootfs.path().join("rootfs"));
        let out = run_timeout(
            "chroot",
            &[
                mounted.dir.to_str().unwrap(),
                "/usr/bin/python3",
                "-c",
                "print(6*7)",
            ],
            &[],
        );
        drop(mounted);
        assert_eq!(text(&out.stdout), "42\n", "{}", text(&out.stderr));
        sn.remove(RemoveSnapshotRequest {
            snapshotter: "lazysnap".into(),
            key,
        })
        .await
        .expect("remove");

        // Mounts that are not lazysnap's, and Diff, go to the next differ.
        let other = tempfile::tempdir().unwrap();
        let err = diff
            .apply(ApplyRequest {
                diff: Some(types::Descriptor {
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    digest: layers[0]["digest"].as_str().unwrap().into(),
                    size: 0,
                    annotations: Default::default(),
                }),
                mounts: vec![types::Mount {
                    r#type: "bind".into(),
                    source: other.path().display().to_string(),
                    target: String::new(),
                    options: vec!["rbind".into(), "rw".into()],
                }],
                payloads: Default::default(),
                sync_fs: false,
            })
            .await
            .expect_err("apply onto a foreign mount");
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
        let err = diff.diff(DiffRequest::default()).await.expect_err("diff");
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
        apply_total.as_secs_f64()
    });
    assert!(env.lazysnap_log().contains("layer indexed, not extracted"));

    // The figures (printed, never asserted): what containerd's own unpack costs here, and
    // lazysnap's import of the same archive.
    let t = Instant::now();
    env.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "lazysnap",
        archive.to_str().unwrap(),
    ]);
    let ctr_import_secs = t.elapsed().as_secs_f64();
    let ours = lazysnap_import_secs(&archive);
    let proxy_diff = env
        .lazysnap_log()
        .matches("layer indexed, not extracted")
        .count()
        > n_layers;
    if containerd_loads_proxy_diff() {
        // containerd 1.7+: its own unpack went through lazysnap's diff plugin.
        assert!(
            proxy_diff,
            "containerd extracted the layers instead of asking lazysnap-diff"
        );
    }
    eprintln!(
        "debian-gzip.oci.tar ({} layers): ctr import --no-unpack {content_secs:.2}s; \
         diff Apply (index) of all layers {apply_secs:.2}s; ctr import with unpack on lazysnap \
         {ctr_import_secs:.2}s ({}); lazysnap import {ours:.2}s",
        n_layers,
        if proxy_diff {
            "through lazysnap's diff plugin"
        } else {
            "containerd's walking differ: this containerd loads no proxy diff plugin"
        }
    );
}
