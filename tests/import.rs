//! [import] end to end: real images in every compression and archive form, the index checked
//! against a peer tar parser (the `tar` crate), random reads against the tar's bytes, and bad
//! input leaving the store as it was.

mod common;

use common::{fails, ok};

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lazysnap::blob::SpanCache;
use lazysnap::digest::Digest;
use lazysnap::index::{Kind, WHITEOUT};
use lazysnap::layer::{IndexedLayer, LayerFiles};
use lazysnap::root::Root;
use lazysnap_fuse::LayerTree;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Everything in the root except SQLite's own files, with sizes: what "the store as it was"
/// means on disk.
fn store_state(root: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, u64)>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("meta.db") || rel == "gc.lock" {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(&p, base, out);
            } else {
                out.push((rel, md.len()));
            }
        }
    }
    walk(root, root, &mut out);
    out.sort();
    out
}

fn images_json(root: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(root, &["images", "--json"])).unwrap()
}

// ---------- a minimal OCI layout writer, to craft bad input ----------

struct Blob {
    data: Vec<u8>,
    media_type: String,
}

fn sha(data: &[u8]) -> String {
    Digest::sha256_of(data).to_string()
}

fn put_blob(layout: &Path, data: &[u8]) -> String {
    let d = sha(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&d[7..]), data).unwrap();
    d
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// A small layer tar with a few files.
fn small_tar(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..5 {
        let len = rng.random_range(0..20_000);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("dir{seed}/file{i}")).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Writes a one-manifest layout; `diff_ids` default to the real ones.
fn write_layout(
    layout: &Path,
    layers: &[Blob],
    diff_ids: &[String],
    platform: (&str, &str),
) -> String {
    let _ = fs::remove_dir_all(layout);
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let config = json!({
        "architecture": platform.1, "os": platform.0,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {}
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = put_blob(layout, &config);
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": put_blob(layout, &l.data), "size": l.data.len()}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layer_descs,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = put_blob(layout, &manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    manifest_digest
}

fn good_layers() -> (Vec<Blob>, Vec<String>) {
    layers_from(1)
}

/// Two layers (gzip, zstd) from seeds `seed` and `seed + 1`.
fn layers_from(seed: u64) -> (Vec<Blob>, Vec<String>) {
    let t1 = small_tar(seed);
    let t2 = small_tar(seed + 1);
    let ids = vec![sha(&t1), sha(&t2)];
    (
        vec![
            Blob {
                data: gzip(&t1),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            },
            Blob {
                data: zstd_of(&t2),
                media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            },
        ],
        ids,
    )
}

/// Imports a good image into `root`, so failures are checked against a non-empty store.
fn seeded_root(tmp: &Path) -> PathBuf {
    let root = tmp.join("root");
    let (layers, ids) = good_layers();
    write_layout(&tmp.join("good"), &layers, &ids, ("linux", "amd64"));
    ok(&root, &["import", tmp.join("good").to_str().unwrap()]);
    root
}

fn assert_rejected(root: &Path, layout: &Path, extra: &[&str], expect: &[&str]) {
    let before = store_state(root);
    let images_before = images_json(root);
    let mut args = vec!["import", layout.to_str().unwrap()];
    args.extend_from_slice(extra);
    let err = fails(root, &args);
    for e in expect {
        assert!(err.contains(e), "error should mention {e:?}: {err}");
    }
    assert_eq!(store_state(root), before, "store changed after: {err}");
    assert_eq!(images_json(root), images_before);
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_the_store_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let root = seeded_root(tmp);
    // Blobs the store does not have yet (one it has is never read from the source again).
    let (layers, ids) = layers_from(10);
    let bad = tmp.join("bad");

    // Blob whose bytes do not hash to its name.
    write_layout(&bad, &layers, &ids, ("linux", "amd64"));
    let victim = bad.join("blobs/sha256").join(&sha(&layers[0].data)[7..]);
    let mut data = fs::read(&victim).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&victim, &data).unwrap();
    assert_rejected(&root, &bad, &[], &[&sha(&layers[0].data), &sha(&data)]);

    // diffID mismatch.
    let wrong = vec![ids[0].clone(), sha(b"not the layer")];
    write_layout(&bad, &layers, &wrong, ("linux", "amd64"));
    assert_rejected(&root, &bad, &[], &["diffID mismatch", &wrong[1], &ids[1]]);

    // Corrupt gzip (digest consistent, data bad) and truncated zstd and tar.
    let mut corrupt = layers[0].data.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let bad_layers = vec![
        Blob {
            data: corrupt,
            media_type: layers[0].media_type.clone(),
        },
        Blob {
            data: layers[1].data.clone(),
            media_type: layers[1].media_type.clone(),
        },
    ];
    write_layout(&bad, &bad_layers, &ids, ("linux", "amd64"));
    assert_rejected(&root, &bad, &[], &["layer"]);
    let truncated_zstd = layers[1].data[..layers[1].data.len() / 2].to_vec();
    let bad_layers = vec![Blob {
        data: truncated_zstd,
        media_type: layers[1].media_type.clone(),
    }];
    write_layout(&bad, &bad_layers, &ids[1..], ("linux", "amd64"));
    assert_rejected(&root, &bad, &[], &["layer"]);
    let t = small_tar(3);
    let bad_layers = vec![Blob {
        data: t[..t.len() - 3000].to_vec(),
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
    }];
    write_layout(&bad, &bad_layers, &[sha(&t)], ("linux", "amd64"));
    assert_rejected(&root, &bad, &[], &["truncated"]);

    // Unknown media type.
    let bad_layers = vec![Blob {
        data: layers[0].data.clone(),
        media_type: "application/x-something".into(),
    }];
    write_layout(&bad, &bad_layers, &ids[..1], ("linux", "amd64"));
    assert_rejected(
        &root,
        &bad,
        &[],
        &["unknown media type", "application/x-something"],
    );

    // A manifest naming a missing blob.
    write_layout(&bad, &layers, &ids, ("linux", "amd64"));
    fs::remove_file(bad.join("blobs/sha256").join(&sha(&layers[1].data)[7..])).unwrap();
    assert_rejected(&root, &bad, &[], &["missing", &sha(&layers[1].data)]);

    // Platform not present.
    write_layout(&bad, &layers, &ids, ("linux", "amd64"));
    assert_rejected(
        &root,
        &bad,
        &["--platform", "linux/s390x"],
        &["linux/s390x", "linux/amd64"],
    );

    // Malformed JSON.
    write_layout(&bad, &layers, &ids, ("linux", "amd64"));
    fs::write(
        bad.join("index.json"),
        b"{\"schemaVersion\": 2, \"manifests\": [",
    )
    .unwrap();
    assert_rejected(&root, &bad, &[], &["index.json"]);

    // Not an image at all.
    let nothing = tmp.join("nothing");
    fs::create_dir_all(&nothing).unwrap();
    assert_rejected(&root, &nothing, &[], &["neither an OCI layout"]);
}

#[test]
fn importing_twice_changes_nothing_and_rmi_removes_what_nothing_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = seeded_root(tmp.path());
    let before = store_state(&root);
    let images = images_json(&root);
    ok(
        &root,
        &["import", tmp.path().join("good").to_str().unwrap()],
    );
    assert_eq!(store_state(&root), before);
    assert_eq!(images_json(&root), images);
    // A second image sharing the first layer: that layer is indexed once.
    let (layers, ids) = good_layers();
    let t3 = small_tar(3);
    let second = vec![
        Blob {
            data: layers[0].data.clone(),
            media_type: layers[0].media_type.clone(),
        },
        Blob {
            data: t3.clone(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        },
    ];
    write_layout(
        &tmp.path().join("second"),
        &second,
        &[ids[0].clone(), sha(&t3)],
        ("linux", "amd64"),
    );
    ok(
        &root,
        &[
            "import",
            tmp.path().join("second").to_str().unwrap(),
            "--name",
            "second:1",
        ],
    );
    let index_files = |root: &Path| fs::read_dir(root.join("index")).unwrap().count();
    // 3 distinct layers (index + spans each) — the shared gzip blob once.
    assert_eq!(index_files(&root), 6);
    let first_name = images[0]["Name"].as_str().unwrap().to_string();
    ok(&root, &["rmi", &first_name]);
    // The shared layer stays, the zstd one of the first image goes.
    assert_eq!(index_files(&root), 4);
    ok(&root, &["rmi", "second:1"]);
    assert_eq!(index_files(&root), 0);
    assert!(store_state(&root).is_empty(), "{:?}", store_state(&root));
}

// ---------- real images, checked against the tar crate ----------

/// What the `tar` crate (a peer parser) says the layer holds, with the layer rules applied:
/// path -> (kind, size, mode, uid, gid, link target, xattrs, data bytes).
#[derive(Debug, Clone, PartialEq)]
struct PeerEntry {
    kind: char,
    size: u64,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    data: Option<Vec<u8>>,
    /// Position of the (last) entry for this path in the tar.
    order: usize,
}

fn peer_entries(uncompressed: &[u8]) -> BTreeMap<String, PeerEntry> {
    let mut out: BTreeMap<String, PeerEntry> = BTreeMap::new();
    let mut ar = tar::Archive::new(uncompressed);
    for (order, e) in ar.entries().unwrap().enumerate() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let norm: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let path = norm.join("/");
        let mut xattrs = BTreeMap::new();
        if let Ok(Some(exts)) = e.pax_extensions() {
            for ext in exts.flatten() {
                // POSIX: an empty pax value deletes the keyword (Go's archive/tar agrees).
                if ext.value_bytes().is_empty() {
                    continue;
                }
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(name.to_vec(), ext.value_bytes().to_vec());
                }
            }
        }
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => 'f',
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::GNUSparse => 's',
            _ => '?',
        };
        let mut data = None;
        if kind == 'f' {
            let mut d = Vec::new();
            e.read_to_end(&mut d).unwrap();
            data = Some(d);
        }
        let link = e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default();
        out.insert(
            path,
            PeerEntry {
                kind,
                size: h.size().unwrap_or(0),
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                link,
                xattrs,
                data,
                order,
            },
        );
    }
    out
}

fn decompress(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match lazysnap::blob::Compression::sniff(blob) {
        lazysnap::blob::Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(blob)
                .read_to_end(&mut out)
                .unwrap();
        }
        lazysnap::blob::Compression::Zstd => {
            out = zstd::decode_all(blob).unwrap();
        }
        lazysnap::blob::Compression::None => out = blob.to_vec(),
    }
    out
}

fn check_image_against_tar(root_path: &Path, name: &str) {
    let root = Root::open(root_path).unwrap();
    let img = root.meta.image(name).unwrap().expect("image recorded");
    let chain = root
        .meta
        .chain_stack(img.chain_id.as_deref().unwrap())
        .unwrap();
    assert_eq!(chain.len(), img.layers.len());
    let cache = SpanCache::new(64 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut total_checked = 0;
    for level in &chain {
        let layer = IndexedLayer::open(&root, level, cache.clone()).unwrap();
        let blob = fs::read(
            root.store
                .blob_path(&Digest::parse(&level.blob_digest).unwrap()),
        )
        .unwrap();
        let tar_bytes = decompress(&blob);
        assert_eq!(sha(&tar_bytes), level.diff_id);
        let peer = peer_entries(&tar_bytes);
        let idx = layer.index();
        let mut checked = 0;
        for (path, pe) in &peer {
            let (dir, base) = match path.rsplit_once('/') {
                Some((d, b)) => (d, b),
                None => ("", path.as_str()),
            };
            // The tar crate decodes neither GNU nor PAX sparse files: those are checked
            // against umoci through the mount instead.
            if path.is_empty() || pe.kind == 's' || path.contains("GNUSparseFile.") {
                continue;
            }
            let dir_node = idx
                .resolve(dir)
                .unwrap_or_else(|| panic!("{name}: dir of {path} missing"));
            if let Some(target) = base.strip_prefix(".wh.") {
                if target == ".wh..opq" {
                    assert_ne!(
                        idx.nodes[dir_node as usize].flags & lazysnap::index::FLAG_OPAQUE,
                        0
                    );
                } else if !target.starts_with(".wh.") {
                    let d = idx.lookup(dir_node, target.as_bytes());
                    assert!(d.is_some(), "{name}: whiteout {path} lost");
                    let full = format!("{dir}/{target}");
                    if !peer.contains_key(full.trim_start_matches('/')) {
                        assert_eq!(d.unwrap().target, WHITEOUT, "{path}");
                    }
                }
                continue;
            }
            let node_id = idx
                .resolve(path)
                .unwrap_or_else(|| panic!("{name}: {path} missing"));
            let node = &idx.nodes[node_id as usize];
            let attr = layer.attr(node_id);
            if pe.kind != 'h' {
                assert_eq!(u32::from(node.perm), pe.mode, "{path} mode");
                assert_eq!(u64::from(node.uid), pe.uid, "{path} uid");
                assert_eq!(u64::from(node.gid), pe.gid, "{path} gid");
                assert_eq!(node.xattrs.len as usize, pe.xattrs.len(), "{path} xattrs");
                let ours: BTreeMap<Vec<u8>, Vec<u8>> = layer.xattrs(node_id).into_iter().collect();
                assert_eq!(ours, pe.xattrs, "{path} xattrs");
            }
            match pe.kind {
                'f' => {
                    assert_eq!(node.kind, Kind::File, "{path}");
                    assert_eq!(node.size, pe.size, "{path} size");
                    let data = pe.data.as_ref().unwrap();
                    // A few random reads per file, and the whole file for small ones.
                    if data.len() <= 64 * 1024 {
                        let mut buf = vec![0u8; data.len()];
                        assert_eq!(layer.read_at(node_id, 0, &mut buf).unwrap(), data.len());
                        assert!(buf == *data, "{path} content");
                    } else {
                        for _ in 0..4 {
                            let off = rng.random_range(0..data.len());
                            let len = rng.random_range(1..=(data.len() - off).min(300_000));
                            let mut buf = vec![0u8; len];
                            assert_eq!(layer.read_at(node_id, off as u64, &mut buf).unwrap(), len);
                            assert!(buf == data[off..off + len], "{path} content at {off}+{len}");
                        }
                    }
                    checked += 1;
                }
                'd' => assert_eq!(node.kind, Kind::Dir, "{path}"),
                'l' => {
                    assert_eq!(node.kind, Kind::Symlink, "{path}");
                    assert_eq!(layer.readlink(node_id).unwrap(), pe.link, "{path}");
                }
                'h' => {
                    let target = String::from_utf8_lossy(&pe.link)
                        .trim_start_matches("./")
                        .to_string();
                    // A target written again after the link is a new file; the link keeps the old.
                    let redefined = peer.get(&target).is_some_and(|t| t.order > pe.order);
                    if !redefined {
                        assert_eq!(idx.resolve(&target), Some(node_id), "{path} -> {target}");
                        assert!(attr.nlink >= 2, "{path} nlink");
                    }
                }
                'c' | 'b' => assert!(matches!(node.kind, Kind::CharDev | Kind::BlockDev)),
                'p' => assert_eq!(node.kind, Kind::Fifo),
                _ => {}
            }
        }
        total_checked += checked;
    }
    assert!(total_checked > 0, "{name}: no file content was checked");
}

#[test]
fn debian_images_in_every_form_index_like_the_tar_says() {
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut diff_ids: Option<serde_json::Value> = None;
    for (src, name) in [
        ("debian-gzip", "debian:gzip"),
        ("debian-zstd", "debian:zstd"),
        ("debian-none", "debian:none"),
        ("debian-gzip.oci.tar", "debian:oci-archive"),
        ("debian-docker.tar", "debian:docker"),
    ] {
        let out = ok(
            &root,
            &["import", data.join(src).to_str().unwrap(), "--name", name],
        );
        assert!(out.contains(name), "{out}");
        let view: serde_json::Value = serde_json::from_str(&ok(&root, &["inspect", name])).unwrap();
        assert_eq!(view["Name"], name);
        assert_eq!(view["Chain"].as_array().unwrap().len(), 3);
        // The same layers in every compression: same diff_ids, same snapshot.
        match &diff_ids {
            None => diff_ids = Some(view["RootFS"].clone()),
            Some(d) => assert_eq!(&view["RootFS"], d, "{src}"),
        }
        check_image_against_tar(&root, name);
    }
    let listed = images_json(&root);
    assert_eq!(listed.as_array().unwrap().len(), 5);
}

#[test]
fn edge_case_images_index_like_the_tar_says() {
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for src in common::EDGE_IMAGES {
        let name = format!("edge:{src}");
        ok(
            &root,
            &["import", data.join(src).to_str().unwrap(), "--name", &name],
        );
        check_image_against_tar(&root, &name);
    }
}

#[test]
fn platform_is_chosen_from_a_multi_platform_index() {
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    for src in ["multiarch", "multiarch-flat"] {
        let layout = data.join(src);
        if !layout.exists() {
            continue;
        }
        ok(
            &root,
            &["import", layout.to_str().unwrap(), "--name", "m:host"],
        );
        let v: serde_json::Value =
            serde_json::from_str(&ok(&root, &["inspect", "m:host"])).unwrap();
        assert_eq!(v["Platform"], lazysnap::image::Platform::host().to_string());
        ok(
            &root,
            &[
                "import",
                layout.to_str().unwrap(),
                "--name",
                "m:arm",
                "--platform",
                "linux/arm64",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&ok(&root, &["inspect", "m:arm"])).unwrap();
        assert!(
            v["Platform"].as_str().unwrap().starts_with("linux/arm64"),
            "{v}"
        );
        let err = fails(
            &root,
            &[
                "import",
                layout.to_str().unwrap(),
                "--platform",
                "linux/riscv64",
            ],
        );
        assert!(
            err.contains("linux/amd64") && err.contains("linux/arm64"),
            "{err}"
        );
    }
    let _ = Arc::new(());
}

#[test]
fn interrupted_import_leaves_only_whole_blobs() {
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    // Interrupt at several moments: every blob visible afterwards hashes to its name, and a
    // second import completes.
    for delay_ms in [30u64, 120, 400] {
        let mut child = Command::new(common::lazysnap_bin())
            .arg("--root")
            .arg(&root)
            .args([
                "import",
                data.join("debian-none").to_str().unwrap(),
                "--name",
                "deb",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
        let blobs = root.join("content/blobs/sha256");
        if let Ok(rd) = fs::read_dir(&blobs) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let bytes = fs::read(e.path()).unwrap();
                assert_eq!(
                    sha(&bytes),
                    format!("sha256:{name}"),
                    "half-written blob visible"
                );
            }
        }
    }
    ok(
        &root,
        &[
            "import",
            data.join("debian-none").to_str().unwrap(),
            "--name",
            "deb",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&root, &["inspect", "deb"])).unwrap();
    assert_eq!(v["Chain"].as_array().unwrap().len(), 3);
    // Leftovers of the interrupted runs are garbage, and gc removes them.
    ok(&root, &["gc"]);
    assert_eq!(
        fs::read_dir(root.join("content/ingest")).unwrap().count(),
        0
    );
}

/// A big file (the kind read at random: a database, model weights) gets restart points close
/// together at import: a cold 4 KiB read anywhere in it decompresses at most 1 MiB (gzip) or
/// 2 zstd windows and a block, while the small files around it keep 4 MiB spans (gzip) or
/// points 4 windows apart (zstd). Single-member gzip and single-frame zstd, as image builders
/// write them.
#[test]
fn a_big_files_random_reads_decompress_little() {
    let files = common::machine_corpus(52 << 20);
    let (big, small) = files.split_at(40 << 20);
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).unwrap();
    };
    for (i, part) in small.chunks(1 << 20).enumerate() {
        add(&mut b, &format!("lib/small{i}"), part);
    }
    add(&mut b, "data/big.db", big);
    add(&mut b, "lib/after", &small[..4 << 20]);
    let layer = b.into_inner().unwrap();
    // Where the big file's bytes and the small files lie in the stream.
    let mut big_at = 0;
    let mut ar = tar::Archive::new(&layer[..]);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().as_os_str() == "data/big.db" {
            big_at = e.raw_file_position();
        }
    }
    assert!(big_at > 0);
    let zstd_window = 2u64 << 20; // zstd -3 on inputs past 1 MiB
    let cases = [
        (
            "gzip",
            gzip(&layer),
            "application/vnd.oci.image.layer.v1.tar+gzip",
            1u64 << 20,
        ),
        (
            "zstd",
            zstd_of(&layer),
            "application/vnd.oci.image.layer.v1.tar+zstd",
            2 * zstd_window + (128 << 10),
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (name, blob, media_type, limit) in cases {
        let layout = tmp.path().join(name);
        write_layout(
            &layout,
            &[Blob {
                data: blob,
                media_type: media_type.into(),
            }],
            &[sha(&layer)],
            ("linux", "amd64"),
        );
        let root_path = tmp.path().join(format!("root-{name}"));
        ok(
            &root_path,
            &["import", layout.to_str().unwrap(), "--name", name],
        );
        let root = Root::open(&root_path).unwrap();
        let img = root.meta.image(name).unwrap().expect("image recorded");
        let chain = root
            .meta
            .chain_stack(img.chain_id.as_deref().unwrap())
            .unwrap();
        // One cold read: what a 4 KiB read at stream offset `at` decompresses.
        let cold_read = |at: u64| {
            let l = IndexedLayer::open(&root, &chain[0], SpanCache::new(64 << 20)).unwrap();
            let mut buf = vec![0u8; 4096];
            let n = l.reader().read_at(at, &mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &layer[at as usize..at as usize + n],
                "{name}: read at {at}"
            );
            l.reader().decompressed_bytes()
        };
        // The pass runs up to ~10 MiB ahead of the tar parser: the file's first MiBs may have
        // the usual spacing. Reads stay inside one span (one crossing a boundary decodes two).
        let map = LayerFiles::of(&root, &chain[0].blob_digest)
            .unwrap()
            .span_map(&root)
            .unwrap();
        let spans: Vec<(u64, u64)> = (0..map.span_count()).map(|i| map.span_extent(i)).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut read_in = |a: u64, b: u64| cold_read(rng.random_range(a..b - 4096));
        let settled = big_at + (14 << 20);
        let big_end = big_at + big.len() as u64;
        let inside: Vec<_> = spans
            .iter()
            .filter(|&&(a, b)| a >= settled && b <= big_end)
            .collect();
        assert!(
            inside.len() as u64 >= (big_end - settled) / limit - 1,
            "{name}: {} spans over the big file's last {} bytes",
            inside.len(),
            big_end - settled
        );
        let mut worst = 0;
        for &&(a, b) in &inside {
            assert!(
                b - a <= limit,
                "{name}: a span of {} bytes in the big file",
                b - a
            );
            worst = worst.max(read_in(a, b));
        }
        assert!(
            worst <= limit,
            "{name}: a 4 KiB read in the big file decompressed {worst} bytes (limit {limit})"
        );
        // Among the small files the spacing stays coarse (and the local disk small).
        let coarse = spans
            .iter()
            .filter(|&&(_, b)| b <= big_at)
            .map(|&(a, b)| read_in(a, b))
            .max()
            .unwrap_or(0);
        assert!(
            coarse > limit,
            "{name}: reads among the small files decompressed at most {coarse} bytes"
        );
        eprintln!("{name}: a cold 4 KiB read decompresses at most {worst} bytes in the big file, {coarse} among the small files");
    }
}
