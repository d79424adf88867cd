//! Hostile and broken input to `lazysnap import`, crafted here byte by byte: truncated and
//! corrupt gzip/zstd layers, bad tar headers (checksums, negative and huge base-256 sizes, a
//! 1 GiB PAX header claim), hardlinks to nothing, decompression bombs, malformed or mislabelled
//! JSON documents, digest mismatches, archive paths leaving the source.
//!
//! Every rejected import must exit non-zero naming the problem, leave the store as it was (no
//! new image, no new file in the root) and touch nothing outside the root (a sentinel tree
//! beside it is compared before and after). What containerd and umoci accept — `..` and
//! absolute member paths (confined to the rootfs), symlinks pointing anywhere, hardlinks whose
//! target path climbs out (resolved inside the rootfs) — is imported, mounted and compared
//! against `umoci unpack`.

mod common;

use common::{fails, lazysnap, ok};

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use lazysnap::digest::Digest;
use serde_json::json;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

// ---------- raw tar, so headers can be as broken as an attacker likes ----------

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}\0");
    field.copy_from_slice(s.as_bytes());
}

fn set_cksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A ustar header with a valid checksum.
fn header(name: &str, typeflag: u8, size: u64, link: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    set_cksum(&mut h);
    h
}

fn pad(out: &mut Vec<u8>) {
    while out.len() % 512 != 0 {
        out.push(0);
    }
}

/// Header + data (padded); `data` may be shorter than the header's size claim.
fn entry(h: &[u8; 512], data: &[u8]) -> Vec<u8> {
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    pad(&mut out);
    out
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    entry(&header(name, b'0', data.len() as u64, ""), data)
}

fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = format!(" {k}={v}\n");
        let mut len = rest.len() + 1;
        while format!("{len}{rest}").len() != len {
            len += 1;
        }
        body.extend_from_slice(format!("{len}{rest}").as_bytes());
    }
    entry(&header("PaxHeaders/x", b'x', body.len() as u64, ""), &body)
}

fn tar_of(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = parts.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn good_tar(tag: &str) -> Vec<u8> {
    tar_of(&[
        entry(&header("etc/", b'5', 0, ""), b""),
        file("etc/passwd", format!("root:x:0:0:{tag}\n").as_bytes()),
        file("etc/data", &vec![7u8; 5000]),
    ])
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

// ---------- a minimal OCI layout writer ----------

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

struct Layer {
    data: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
}

fn layer(tar: &[u8], media_type: &'static str) -> Layer {
    let data = match media_type {
        TAR_GZ => gzip(tar),
        TAR_ZST => zstd_of(tar),
        _ => tar.to_vec(),
    };
    Layer {
        data,
        media_type,
        diff_id: sha(tar),
    }
}

/// The JSON documents of a one-image layout, to be broken before writing.
struct Docs {
    config: Vec<u8>,
    /// Manifest JSON as a value (layers and config descriptors filled in by `write`).
    manifest_media_type: String,
    config_media_type: String,
}

impl Docs {
    fn for_layers(layers: &[Layer]) -> Docs {
        let config = json!({
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
            "config": {}
        });
        Docs {
            config: serde_json::to_vec(&config).unwrap(),
            manifest_media_type: MANIFEST.into(),
            config_media_type: CONFIG.into(),
        }
    }
}

/// Writes a layout tagged `latest`; `edit_manifest` may break the manifest bytes.
fn write_layout_with(
    layout: &Path,
    layers: &[Layer],
    docs: &Docs,
    edit_manifest: &dyn Fn(Vec<u8>) -> Vec<u8>,
) {
    let _ = fs::remove_dir_all(layout);
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let config_digest = put_blob(layout, &docs.config);
    let descs: Vec<_> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": put_blob(layout, &l.data), "size": l.data.len()}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": docs.config_media_type, "digest": config_digest, "size": docs.config.len()},
        "layers": descs,
    });
    let manifest = edit_manifest(serde_json::to_vec(&manifest).unwrap());
    let manifest_digest = put_blob(layout, &manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": docs.manifest_media_type, "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": common::TAG}}]
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn write_layout(layout: &Path, layers: &[Layer]) {
    write_layout_with(layout, layers, &Docs::for_layers(layers), &|m| m);
}

// ---------- the world around the root ----------

/// `tmp/world/` holds the root and a sentinel tree beside it; layouts live in `tmp/src/`.
struct Fixture {
    _tmp: tempfile::TempDir,
    world: PathBuf,
    root: PathBuf,
    src: PathBuf,
}

impl Fixture {
    /// A root that already holds one good image, so "unchanged" is checked against a
    /// non-empty store.
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let world = tmp.path().join("world");
        let root = world.join("root");
        let src = tmp.path().join("src");
        let sentinel = world.join("sentinel");
        fs::create_dir_all(sentinel.join("etc")).unwrap();
        fs::write(sentinel.join("etc/passwd"), b"sentinel\n").unwrap();
        fs::write(world.join("keep"), b"keep\n").unwrap();
        fs::create_dir_all(&src).unwrap();
        let good = src.join("good");
        write_layout(&good, &[layer(&good_tar("seed"), TAR_GZ)]);
        ok(&root, &["import", good.to_str().unwrap(), "--name", "seed"]);
        Fixture {
            _tmp: tmp,
            world,
            root,
            src,
        }
    }

    fn layout(&self, name: &str) -> PathBuf {
        self.src.join(name)
    }

    /// Everything under `world/` except the root: path, mode, size, mtime.
    fn outside_root(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(
            &self.world,
            &self.world,
            &mut out,
            &|rel| rel == "root",
            true,
        );
        out
    }

    /// Everything in the root except SQLite's own files: the store on disk (directory mtimes
    /// aside: a failed import's temporary files come and go).
    fn store_state(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(
            &self.root,
            &self.root,
            &mut out,
            &|rel| rel.starts_with("meta.db"),
            false,
        );
        out
    }

    fn images(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&self.root, &["images", "--json"])).unwrap()
    }

    /// Import of `layout` fails, naming every string of `expect`, and changes nothing.
    fn rejects(&self, layout: &Path, extra: &[&str], expect: &[&str]) -> String {
        let (store, outside, images) = (self.store_state(), self.outside_root(), self.images());
        let mut args = vec!["import", layout.to_str().unwrap()];
        args.extend_from_slice(extra);
        let err = fails(&self.root, &args);
        for e in expect {
            assert!(err.contains(e), "error should mention {e:?}: {err}");
        }
        assert!(
            err.contains("lazysnap: error:") && !err.contains("panicked"),
            "not a clean error: {err}"
        );
        assert_eq!(self.store_state(), store, "store changed after: {err}");
        assert_eq!(
            self.outside_root(),
            outside,
            "outside the root changed: {err}"
        );
        assert_eq!(self.images(), images, "image list changed after: {err}");
        err
    }
}

fn walk(
    dir: &Path,
    base: &Path,
    out: &mut Vec<String>,
    skip: &dyn Fn(&str) -> bool,
    dir_mtimes: bool,
) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
        if skip(&rel) {
            continue;
        }
        let md = fs::symlink_metadata(&p).unwrap();
        let mtime = if md.is_dir() && !dir_mtimes {
            0
        } else {
            md.mtime()
        };
        out.push(format!(
            "{rel} {:o} {} {mtime}",
            md.mode(),
            if md.is_dir() { 0 } else { md.len() },
        ));
        if md.is_dir() {
            walk(&p, base, out, skip, dir_mtimes);
        }
    }
}

// ---------- rejected layers ----------

#[test]
fn corrupt_layers_are_rejected_and_change_nothing() {
    let fx = Fixture::new();
    let l = fx.layout("bad");
    let t = good_tar("victim");

    // gzip: cut short, bytes flipped mid-stream, a wrong CRC in the trailer.
    let gz = gzip(&t);
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "truncated gzip",
            gz[..gz.len() / 2].to_vec(),
            &["truncated gzip data"],
        ),
        (
            "corrupt gzip",
            {
                let mut g = gz.clone();
                let mid = g.len() / 2;
                for b in &mut g[mid..mid + 8] {
                    *b ^= 0x5a;
                }
                g
            },
            &["corrupt gzip data"],
        ),
        (
            "gzip trailer",
            {
                let mut g = gz.clone();
                let n = g.len();
                g[n - 8] ^= 0xff;
                g
            },
            &["corrupt gzip data", "incorrect data check"],
        ),
    ];
    for (what, data, expect) in cases {
        let bad = Layer {
            data,
            media_type: TAR_GZ,
            diff_id: sha(&t),
        };
        write_layout(&l, &[bad]);
        let err = fx.rejects(&l, &[], expect);
        eprintln!("{what}: {err}");
    }

    // zstd: cut short, a corrupt block.
    let zs = zstd_of(&t);
    for (what, data, expect) in [
        (
            "truncated zstd",
            zs[..zs.len() - 10].to_vec(),
            &["truncated zstd data"][..],
        ),
        (
            "corrupt zstd",
            {
                let mut z = zs.clone();
                let n = z.len();
                for b in &mut z[n / 2..n / 2 + 8] {
                    *b ^= 0xa5;
                }
                z
            },
            &["corrupt zstd data"][..],
        ),
    ] {
        let bad = Layer {
            data,
            media_type: TAR_ZST,
            diff_id: sha(&t),
        };
        write_layout(&l, &[bad]);
        let err = fx.rejects(&l, &[], expect);
        eprintln!("{what}: {err}");
    }
}

#[test]
fn hostile_tar_headers_are_rejected_and_change_nothing() {
    let fx = Fixture::new();
    let l = fx.layout("bad");
    let mut bad_sum = header("etc/passwd", b'0', 4, "");
    bad_sum[148..156].copy_from_slice(b"0000000\0");
    let mut negative = header("neg", b'0', 0, "");
    negative[124..136].fill(0xff); // base-256 -1
    set_cksum(&mut negative);
    let mut huge = header("huge", b'0', 0, "");
    huge[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0]); // 2^62
    set_cksum(&mut huge);
    let mut overflow = header("overflow", b'0', 0, "");
    overflow[124..136].copy_from_slice(&[
        0xbf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    set_cksum(&mut overflow);
    let pax_1g = entry(
        &header("PaxHeaders/big", b'x', 1 << 30, ""),
        b"30 path=aaaaaaaaaaaaaaaaaaaa\n",
    );
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "bad checksum",
            tar_of(&[entry(&bad_sum, b"root")]),
            &["bad tar header at offset 0", "checksum mismatch"],
        ),
        (
            "not a tar at all",
            b"just some text, no tar header here".repeat(40),
            &["bad tar header at offset 0"],
        ),
        (
            "negative base-256 size",
            tar_of(&[entry(&negative, b"")]),
            &["bad tar header at offset 0", "negative size"],
        ),
        (
            "2^62-byte base-256 size",
            tar_of(&[entry(&huge, b"tiny")]),
            &["truncated tar stream", "file data"],
        ),
        (
            "base-256 size past i64",
            tar_of(&[entry(&overflow, b"")]),
            &["size out of range"],
        ),
        (
            "1 GiB pax header",
            tar_of(&[pax_1g, file("f", b"x")]),
            &["pax header of 1073741824 bytes exceeds the limit"],
        ),
        (
            "pax size record of 1 GiB",
            tar_of(&[pax(&[("size", "1073741824")]), file("f", b"x")]),
            &["truncated tar stream", "file data"],
        ),
        (
            "bad pax record",
            tar_of(&[
                entry(&header("PaxHeaders/x", b'x', 12, ""), b"99 path=abc\n"),
                file("f", b"x"),
            ]),
            &["malformed pax record"],
        ),
        (
            "hardlink to a missing target",
            tar_of(&[
                file("a", b"a"),
                entry(&header("b", b'1', 0, "nowhere"), b""),
            ]),
            &[
                "hardlink to \"nowhere\"",
                "not an earlier non-directory entry",
            ],
        ),
        (
            "hardlink climbing out of the rootfs to nothing",
            tar_of(&[entry(&header("b", b'1', 0, "../../../etc/passwd"), b"")]),
            &["hardlink to \"../../../etc/passwd\""],
        ),
        (
            "hardlink to a directory",
            tar_of(&[
                entry(&header("d/", b'5', 0, ""), b""),
                entry(&header("b", b'1', 0, "d"), b""),
            ]),
            &["hardlink to \"d\""],
        ),
        (
            "truncated inside a header",
            file("a", &[1u8; 600])[..700].to_vec(),
            &["truncated tar stream"],
        ),
        (
            "unknown entry type",
            tar_of(&[entry(&header("m", b'M', 0, ""), b"")]),
            &["multi-volume"],
        ),
    ];
    for (what, t, expect) in cases {
        for media_type in [TAR, TAR_GZ] {
            write_layout(&l, &[layer(&t, media_type)]);
            let err = fx.rejects(&l, &[], expect);
            eprintln!("{what} ({media_type}): {err}");
        }
    }
}

#[test]
fn decompression_bombs_are_refused() {
    let fx = Fixture::new();
    let l = fx.layout("bomb");
    // 64 MiB of zeros after a valid tar: gzip makes it ~64 KiB.
    let mut t = good_tar("bomb");
    t.resize(t.len() + (64 << 20), 0);
    write_layout(&l, &[layer(&t, TAR_GZ)]);
    fx.rejects(
        &l,
        &["--max-layer-size", "16M"],
        &[
            "exceeds the maximum layer size of 16777216 bytes",
            "--max-layer-size",
            "decompression bomb",
        ],
    );
    // The same layer under a generous limit imports.
    ok(
        &fx.root,
        &[
            "import",
            l.to_str().unwrap(),
            "--name",
            "zeros",
            "--max-layer-size",
            "1G",
        ],
    );

    // A zstd bomb past the default ratio (10000:1 once over 1 GiB): 1.25 GiB of zeros.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    let good = good_tar("zbomb");
    enc.write_all(&good).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1280 {
        enc.write_all(&zeros).unwrap();
    }
    let data = enc.finish().unwrap();
    assert!(data.len() < 130_000, "zstd made {} bytes", data.len());
    let bomb = Layer {
        data,
        media_type: TAR_ZST,
        diff_id: sha(b"unknowable without decompressing"),
    };
    write_layout(&l, &[bomb]);
    fx.rejects(
        &l,
        &[],
        &["times the", "--max-layer-ratio", "decompression bomb"],
    );
}

// ---------- rejected documents ----------

#[test]
fn malformed_documents_are_rejected_and_change_nothing() {
    let fx = Fixture::new();
    let l = fx.layout("bad");
    let t = good_tar("docs");
    let layers = || vec![layer(&t, TAR_GZ)];

    // Malformed manifest.
    write_layout_with(&l, &layers(), &Docs::for_layers(&layers()), &|m| {
        m[..m.len() - 2].to_vec()
    });
    fx.rejects(&l, &[], &["malformed JSON in manifest sha256:"]);
    // A manifest that is JSON but not a manifest.
    write_layout_with(&l, &layers(), &Docs::for_layers(&layers()), &|_| {
        br#"{"schemaVersion": 2, "layers": "no"}"#.to_vec()
    });
    fx.rejects(&l, &[], &["malformed JSON in manifest sha256:"]);
    // Malformed config.
    let mut docs = Docs::for_layers(&layers());
    docs.config = b"{\"architecture\": 42}".to_vec();
    write_layout_with(&l, &layers(), &docs, &|m| m);
    fx.rejects(&l, &[], &["malformed JSON in config sha256:"]);
    // Config with a diff_id that is not a digest.
    let mut docs = Docs::for_layers(&layers());
    docs.config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:../../etc/passwd"]}}))
    .unwrap();
    write_layout_with(&l, &layers(), &docs, &|m| m);
    fx.rejects(&l, &[], &["invalid digest \"sha256:../../etc/passwd\""]);
    // More layers than diff_ids.
    let mut docs = Docs::for_layers(&layers());
    docs.config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}}))
    .unwrap();
    write_layout_with(&l, &layers(), &docs, &|m| m);
    fx.rejects(&l, &[], &["has 1 layers but its config lists 0 diff_ids"]);

    // Wrong media types: the index names a config as the manifest; a layer type nobody
    // knows; a gzip label on zstd data.
    let mut docs = Docs::for_layers(&layers());
    docs.manifest_media_type = CONFIG.into();
    write_layout_with(&l, &layers(), &docs, &|m| m);
    fx.rejects(&l, &[], &["unknown media type", CONFIG]);
    let mut odd = layers();
    odd[0].media_type = "application/x-tar-maybe";
    write_layout(&l, &odd);
    fx.rejects(&l, &[], &["unknown media type", "application/x-tar-maybe"]);
    let mut mislabelled = vec![layer(&t, TAR_ZST)];
    mislabelled[0].media_type = TAR_GZ;
    write_layout(&l, &mislabelled);
    fx.rejects(&l, &[], &["is labelled gzip", "but its data is zstd"]);

    // Digest mismatch: the layer blob's bytes are not what its name says; and a diffID
    // mismatch (the blob is fine, the config lies).
    write_layout(&l, &layers());
    let victim = l.join("blobs/sha256").join(&sha(&layers()[0].data)[7..]);
    let mut data = fs::read(&victim).unwrap();
    data.push(0);
    fs::write(&victim, &data).unwrap();
    fx.rejects(&l, &[], &["blob digest mismatch", &sha(&layers()[0].data)]);
    let mut lying = layers();
    lying[0].diff_id = sha(b"something else");
    write_layout(&l, &lying);
    fx.rejects(
        &l,
        &[],
        &["diffID mismatch", &sha(b"something else"), &sha(&t)],
    );
    // A descriptor whose digest would name a path outside the store (oci-spec refuses the
    // manifest); in index.json, our own digest check refuses it.
    write_layout_with(&l, &layers(), &Docs::for_layers(&layers()), &|m| {
        String::from_utf8(m)
            .unwrap()
            .replacen("sha256:", "sha256:../../../", 1)
            .into_bytes()
    });
    fx.rejects(&l, &[], &["malformed JSON in manifest sha256:"]);
    write_layout(&l, &layers());
    let index = fs::read_to_string(l.join("index.json")).unwrap();
    let hex_at = index.find("sha256:").unwrap() + 7;
    let evil = format!("{}../../../../{}", &index[..hex_at], &index[hex_at + 12..]);
    fs::write(l.join("index.json"), evil).unwrap();
    fx.rejects(&l, &[], &["index.json"]);
    // A JSON document claiming to be huge.
    write_layout_with(&l, &layers(), &Docs::for_layers(&layers()), &|m| {
        let mut v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        v["config"]["size"] = json!(1u64 << 40);
        serde_json::to_vec(&v).unwrap()
    });
    fx.rejects(&l, &[], &["over the", "limit for JSON documents"]);
    // index.json that is not JSON.
    write_layout(&l, &layers());
    fs::write(l.join("index.json"), b"\x00\x01 not json").unwrap();
    fx.rejects(&l, &[], &["malformed JSON in index.json"]);
}

#[test]
fn docker_archives_cannot_reach_outside_and_bad_ones_change_nothing() {
    let fx = Fixture::new();
    let l = fx.layout("docker");
    let t = good_tar("docker");
    let write = |manifest: &[u8]| {
        let _ = fs::remove_dir_all(&l);
        fs::create_dir_all(l.join("x")).unwrap();
        fs::write(l.join("x/layer.tar"), &t).unwrap();
        fs::write(
            l.join("config.json"),
            serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [sha(&t)]}}))
            .unwrap(),
        )
        .unwrap();
        fs::write(l.join("manifest.json"), manifest).unwrap();
    };
    write(b"[{\"Config\": \"config.json\", \"Layers\": ");
    fx.rejects(&l, &[], &["malformed JSON in manifest.json"]);
    // Member paths leaving the archive: `..` is refused, a leading `/` is relative to the
    // archive (so the host's /etc/passwd is not read, the archive has no etc/passwd).
    for (path, expect) in [
        (
            "../world/sentinel/etc/passwd",
            &["bad path", "../world/sentinel/etc/passwd"][..],
        ),
        ("x/../../src/good/index.json", &["bad path"][..]),
        ("/etc/passwd", &["missing: etc/passwd in"][..]),
    ] {
        write(
            serde_json::to_string(&json!([{"Config": "config.json", "Layers": [path]}]))
                .unwrap()
                .as_bytes(),
        );
        fx.rejects(&l, &[], expect);
    }
    // A directory as a layer (found by the manifest_config fuzz target), and a symlink in
    // the archive directory leading to the sentinel's passwd.
    write(br#"[{"Config": "config.json", "Layers": ["x"]}]"#);
    fx.rejects(&l, &[], &["x in", "is not a regular file"]);
    write(br#"[{"Config": "config.json", "Layers": ["x/evil.tar"]}]"#);
    std::os::unix::fs::symlink(fx.world.join("sentinel/etc/passwd"), l.join("x/evil.tar")).unwrap();
    fx.rejects(&l, &[], &["x/evil.tar in", "leads outside it"]);
    write(br#"[{"Config": "config.json", "Layers": ["x/layer.tar"], "RepoTags": ["d:1"]}]"#);
    ok(&fx.root, &["import", l.to_str().unwrap()]);
}

// ---------- accepted, confined ----------

/// Member paths with `..` or a leading `/` are confined to the rootfs (containerd clamps `..`
/// at the root; umoci resolves inside it), symlinks keep their targets verbatim, a hardlink
/// whose target climbs out resolves inside the rootfs. The mounted tree must equal umoci's
/// unpack and nothing outside the root may appear.
#[test]
fn breakout_paths_are_confined_like_umoci() {
    let fx = Fixture::new();
    let l = fx.layout("escape");
    let t = tar_of(&[
        entry(&header("etc/", b'5', 0, ""), b""),
        file("etc/passwd", b"inside\n"),
        file("../../world/sentinel/etc/passwd", b"pwned\n"),
        file("/abs/file", b"absolute\n"),
        file("a/../../b", b"b\n"),
        entry(&header("link-out", b'2', 0, "../../../../etc/shadow"), b""),
        entry(&header("link-abs", b'2', 0, "/etc/passwd"), b""),
        entry(&header("hard-up", b'1', 0, "../../etc/passwd"), b""),
        entry(&header("hard-abs", b'1', 0, "/etc/passwd"), b""),
    ]);
    write_layout(&l, &[layer(&t, TAR_GZ)]);
    let outside = fx.outside_root();
    ok(
        &fx.root,
        &["import", l.to_str().unwrap(), "--name", "escape"],
    );
    assert_eq!(fx.outside_root(), outside, "import touched the world");
    assert_eq!(
        fs::read(fx.world.join("sentinel/etc/passwd")).unwrap(),
        b"sentinel\n"
    );

    if !common::can_mount() {
        return;
    }
    let mnt = fx.src.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = ok(&fx.root, &["mount", "escape", mnt.to_str().unwrap()]);
    assert!(out.contains("mounted"), "{out}");
    struct Unmount<'a>(&'a Path, &'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = lazysnap(self.0, &["umount", self.1.to_str().unwrap()]);
        }
    }
    let _guard = Unmount(&fx.root, &mnt);
    let read = |p: &str| fs::read(mnt.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("world/sentinel/etc/passwd"), b"pwned\n");
    assert_eq!(read("abs/file"), b"absolute\n");
    assert_eq!(read("b"), b"b\n");
    assert_eq!(read("hard-up"), b"inside\n");
    assert_eq!(read("hard-abs"), b"inside\n");
    assert_eq!(fs::metadata(mnt.join("etc/passwd")).unwrap().nlink(), 3);
    assert_eq!(
        fs::read_link(mnt.join("link-out")).unwrap(),
        Path::new("../../../../etc/shadow")
    );
    assert_eq!(
        fs::read_link(mnt.join("link-abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(fx.outside_root(), outside, "the mount touched the world");

    if common::require(common::have_cmd("umoci"), "umoci (scripts/install-deps.sh)") {
        let reference = common::reference_tree(&l, common::TAG);
        common::assert_trees_equal(&mnt, &reference);
    }
}
