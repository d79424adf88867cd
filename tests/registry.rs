//! [registry] pull and push against a real registry (Debian's docker-registry, distribution
//! 2.8, started by scripts/registry-env.sh on 127.0.0.1): images pushed by skopeo and by
//! `lazysnap push`, pulled by `lazysnap pull`, mounted and compared with umoci's unpack;
//! Basic auth (htpasswd + docker config.json), the Bearer token flow, a dropped connection
//! resumed with a Range request, a corrupted blob rejected, platform choice from an index.
//! Proxied cases run scripts/registry-proxy.py between lazysnap and the registry.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::{skopeo_push, Proxy, Registry};
use common::{fails, lazysnap, ok, Mounted};

fn prerequisites() -> bool {
    // Hermetic credentials: the machine's ~/.docker/config.json is not read (tests that test
    // credentials pass their own DOCKER_CONFIG to the child).
    static EMPTY_CONFIG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = EMPTY_CONFIG.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("lazysnap-registry-test-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        std::env::set_var("DOCKER_CONFIG", &d);
        d
    });
    assert!(dir.is_dir());
    common::require(
        common::have_cmd("docker-registry"),
        "docker-registry (scripts/install-deps.sh)",
    ) && common::require(
        common::have_cmd("skopeo"),
        "skopeo (scripts/install-deps.sh)",
    ) && common::require(common::have_cmd("htpasswd"), "htpasswd (apache2-utils)")
}

/// [`lazysnap_env`] that must succeed; its stdout.
fn ok_env(root: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = lazysnap_env(root, args, env);
    assert!(
        out.status.success(),
        "lazysnap {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lazysnap` with extra environment (DOCKER_CONFIG).
fn lazysnap_env(root: &Path, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(common::lazysnap_bin());
    cmd.arg("--root").arg(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running lazysnap")
}

/// A docker config dir whose config.json holds `user:pass` for `host`.
fn docker_config(dir: &Path, host: &str, user_pass: &str) -> PathBuf {
    use base64::Engine as _;
    fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
    fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    dir.to_path_buf()
}

fn inspect(root: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(root, &["inspect", name])).unwrap()
}

/// The parts of an image that must not depend on where it came from.
fn identity(v: &serde_json::Value) -> (String, String, String, String) {
    (
        v["Manifest"]["digest"].to_string(),
        v["Config"]["digest"].to_string(),
        v["RootFS"].to_string(),
        v["Snapshot"].to_string(),
    )
}

/// No blobs or ingest leftovers in a store.
fn store_is_empty(root: &Path) -> bool {
    let count = |d: &str| fs::read_dir(root.join(d)).map_or(0, |r| r.count());
    count("content/blobs/sha256") == 0 && count("content/ingest") == 0 && count("index") == 0
}

#[test]
fn pull_what_skopeo_and_lazysnap_pushed_equals_umoci_unpack() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);

    // Pushed by skopeo, pulled by lazysnap: same image as a local import, same tree as umoci.
    let local = tmp.path().join("local");
    ok(
        &local,
        &[
            "import",
            data.join("debian-gzip").to_str().unwrap(),
            "--name",
            "gz",
        ],
    );
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/debian:gzip", reg.addr),
        None,
        false,
    );
    let root = tmp.path().join("root");
    let reference = format!("{}/debian:gzip", reg.addr);
    let out = ok(&root, &["pull", &reference]);
    assert!(out.contains(&format!("pulled {reference}")), "{out}");
    assert_eq!(
        identity(&inspect(&root, &reference)),
        identity(&inspect(&local, "gz"))
    );
    {
        let _m = Mounted::new(&root, &reference, &tmp.path().join("mnt-gzip"));
        common::assert_trees_equal(
            &tmp.path().join("mnt-gzip"),
            &common::reference_tree(&data.join("debian-gzip"), common::TAG),
        );
    }
    // Pulling again fetches the manifest only: every blob is there.
    ok(&root, &["pull", &reference, "--name", "again"]);

    // Pushed by lazysnap (from a local import), pulled by lazysnap into a fresh store.
    ok(
        &local,
        &[
            "import",
            data.join("debian-zstd").to_str().unwrap(),
            "--name",
            "zst",
        ],
    );
    let zref = format!("{}/pushed/debian:zstd", reg.addr);
    let out = ok(&local, &["push", "zst", &zref]);
    assert!(out.contains("4 blobs uploaded"), "{out}");
    // A second push finds every blob present.
    let out = ok(&local, &["push", "zst", &zref]);
    assert!(
        out.contains("0 blobs uploaded") && out.contains("4 already there"),
        "{out}"
    );
    let root2 = tmp.path().join("root2");
    ok(&root2, &["pull", &zref, "--name", "zst"]);
    assert_eq!(
        identity(&inspect(&root2, "zst")),
        identity(&inspect(&local, "zst"))
    );
    let _m = Mounted::new(&root2, "zst", &tmp.path().join("mnt-zstd"));
    common::assert_trees_equal(
        &tmp.path().join("mnt-zstd"),
        &common::reference_tree(&data.join("debian-zstd"), common::TAG),
    );
}

#[test]
fn platform_is_chosen_from_a_multiarch_index() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let reference = format!("{}/multi:latest", reg.addr);
    skopeo_push(&data.join("multiarch"), &reference, None, true);
    let root = tmp.path().join("root");
    for (platform, name) in [("linux/arm64", "arm"), ("linux/amd64", "amd")] {
        ok(
            &root,
            &["pull", &reference, "--platform", platform, "--name", name],
        );
        let v = inspect(&root, name);
        assert_eq!(v["Platform"], platform, "{v}");
        assert!(
            v["Target"]["mediaType"].as_str().unwrap().contains("index"),
            "{v}"
        );
    }
    assert_ne!(
        inspect(&root, "arm")["Manifest"]["digest"],
        inspect(&root, "amd")["Manifest"]["digest"]
    );
    // By digest: the index's digest, then a platform from it.
    let index = inspect(&root, "arm")["Target"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let by_digest = format!("{}/multi@{index}", reg.addr);
    ok(
        &root,
        &[
            "pull",
            &by_digest,
            "--platform",
            "linux/arm64",
            "--name",
            "d",
        ],
    );
    assert_eq!(
        inspect(&root, "d")["Manifest"],
        inspect(&root, "arm")["Manifest"]
    );
    let absent = format!("{}/multi@sha256:{}", reg.addr, "0".repeat(64));
    let err = fails(&root, &["pull", &absent]);
    assert!(err.contains("not found"), "{err}");
    let err = fails(&root, &["pull", &reference, "--platform", "linux/s390x"]);
    assert!(
        err.contains("no manifest for platform linux/s390x")
            && err.contains("linux/amd64")
            && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn basic_auth_with_docker_config() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), Some("tester:right-pass"));
    let reference = format!("{}/auth/debian:gzip", reg.addr);
    skopeo_push(
        &data.join("debian-gzip"),
        &reference,
        Some("tester:right-pass"),
        false,
    );
    let root = tmp.path().join("root");

    let none = tmp.path().join("no-config");
    fs::create_dir_all(&none).unwrap();
    let out = lazysnap_env(&root, &["pull", &reference], &[("DOCKER_CONFIG", &none)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("requires authentication"), "{err}");

    let wrong = docker_config(&tmp.path().join("wrong"), &reg.addr, "tester:wrong-pass");
    let out = lazysnap_env(&root, &["pull", &reference], &[("DOCKER_CONFIG", &wrong)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("authentication to") && err.contains("\"tester\""),
        "{err}"
    );
    assert!(store_is_empty(&root), "a refused pull left blobs");

    let right = docker_config(&tmp.path().join("right"), &reg.addr, "tester:right-pass");
    ok_env(&root, &["pull", &reference], &[("DOCKER_CONFIG", &right)]);
    // Push with the same credentials.
    ok_env(
        &root,
        &["push", &reference, &format!("{}/auth/copy:1", reg.addr)],
        &[("DOCKER_CONFIG", &right)],
    );
}

#[test]
fn bearer_token_flow() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/tok:1", reg.addr),
        None,
        false,
    );

    // Anonymous tokens.
    let anon = Proxy::start(&reg.addr, &["--bearer"]);
    let root = tmp.path().join("root");
    let none = tmp.path().join("no-config");
    fs::create_dir_all(&none).unwrap();
    ok_env(
        &root,
        &["pull", &format!("{}/tok:1", anon.addr)],
        &[("DOCKER_CONFIG", &none)],
    );

    // Tokens for a user only.
    let private = Proxy::start(&reg.addr, &["--bearer", "tok-user:tok-pass"]);
    let reference = format!("{}/tok:1", private.addr);
    let root2 = tmp.path().join("root2");
    let out = lazysnap_env(&root2, &["pull", &reference], &[("DOCKER_CONFIG", &none)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("requires authentication"),
        "{err}"
    );
    let wrong = docker_config(&tmp.path().join("wrong"), &private.addr, "tok-user:nope");
    let out = lazysnap_env(&root2, &["pull", &reference], &[("DOCKER_CONFIG", &wrong)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("token server"),
        "{err}"
    );
    let right = docker_config(
        &tmp.path().join("right"),
        &private.addr,
        "tok-user:tok-pass",
    );
    ok_env(&root2, &["pull", &reference], &[("DOCKER_CONFIG", &right)]);
    // And push through the token flow (scope pull,push).
    ok_env(
        &root2,
        &["push", &reference, &format!("{}/tok-copy:1", private.addr)],
        &[("DOCKER_CONFIG", &right)],
    );
}

#[test]
fn dropped_connection_is_resumed_with_a_range_request() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/cut:1", reg.addr),
        None,
        false,
    );
    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(
        &reg.addr,
        &["--cut-after", "100000", "--log", log.to_str().unwrap()],
    );
    let root = tmp.path().join("root");
    ok(
        &root,
        &["pull", &format!("{}/cut:1", proxy.addr), "--name", "cut"],
    );
    let log = fs::read_to_string(&log).unwrap();
    assert!(
        log.contains(" bytes=100000-"),
        "no resumed request in the proxy log:\n{log}"
    );
    // Every blob byte-identical to the layout's.
    let v = inspect(&root, "cut");
    let mut checked = 0;
    for hex in fs::read_dir(root.join("content/blobs/sha256")).unwrap() {
        let hex = hex.unwrap().file_name().into_string().unwrap();
        let ours = fs::read(root.join("content/blobs/sha256").join(&hex)).unwrap();
        let theirs = data.join("debian-gzip/blobs/sha256").join(&hex);
        if theirs.is_file() {
            assert!(ours == fs::read(&theirs).unwrap(), "blob {hex} differs");
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} blobs compared ({v})");
    let local = tmp.path().join("local");
    ok(
        &local,
        &[
            "import",
            data.join("debian-gzip").to_str().unwrap(),
            "--name",
            "gz",
        ],
    );
    assert_eq!(identity(&v), identity(&inspect(&local, "gz")));

    // A registry that ignores Range: the resumed download skips what it already has.
    let plain = Proxy::start(&reg.addr, &["--cut-after", "100000", "--no-ranges"]);
    let root2 = tmp.path().join("root2");
    ok(
        &root2,
        &["pull", &format!("{}/cut:1", plain.addr), "--name", "cut"],
    );
    assert_eq!(identity(&inspect(&root2, "cut")), identity(&v));
}

#[test]
fn corrupted_blob_is_rejected_and_nothing_recorded() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/bad:1", reg.addr),
        None,
        false,
    );
    let proxy = Proxy::start(&reg.addr, &["--corrupt"]);
    let root = tmp.path().join("root");
    let err = fails(&root, &["pull", &format!("{}/bad:1", proxy.addr)]);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(ok(&root, &["images", "--json"]).trim() == "[]");
    assert!(store_is_empty(&root), "a rejected pull left blobs behind");
}

#[test]
fn mirror_is_tried_first_and_origin_is_the_fallback() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let origin = Registry::start(&tmp.path().join("origin"), None);
    let mirror = Registry::start(&tmp.path().join("mirror"), None);
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/m:1", origin.addr),
        None,
        false,
    );
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/m:1", mirror.addr),
        None,
        false,
    );
    let log = tmp.path().join("mirror.log");
    let logged = Proxy::start(&mirror.addr, &["--log", log.to_str().unwrap()]);
    let root = tmp.path().join("root");
    let reference = format!("{}/m:1", origin.addr);
    ok(&root, &["pull", &reference, "--mirror", &logged.addr]);
    let served = fs::read_to_string(&log).unwrap();
    assert!(served.matches("GET /v2/m/blobs/").count() >= 4, "{served}");
    // A mirror that is down: the origin serves.
    let root2 = tmp.path().join("root2");
    ok(&root2, &["pull", &reference, "--mirror", "127.0.0.1:9"]);
}

#[test]
fn server_errors_and_429_are_retried_with_backoff() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    skopeo_push(
        &data.join("debian-gzip"),
        &format!("{}/flaky:1", reg.addr),
        None,
        false,
    );
    for status in ["503", "429"] {
        let log = tmp.path().join(format!("{status}.log"));
        let proxy = Proxy::start(
            &reg.addr,
            &[
                "--fail-first",
                "2",
                "--fail-status",
                status,
                "--log",
                log.to_str().unwrap(),
            ],
        );
        let root = tmp.path().join(format!("root-{status}"));
        ok(
            &root,
            &["pull", &format!("{}/flaky:1", proxy.addr), "--name", "f"],
        );
        let gets = fs::read_to_string(&log)
            .unwrap()
            .matches("GET /v2/flaky/blobs/")
            .count();
        // config + 3 layers, plus the 2 refused attempts.
        assert_eq!(gets, 6, "{status}");
    }
}

#[test]
fn read_range_serves_the_bytes_asked_for() {
    use lazysnap::digest::Digest;
    use lazysnap::registry::{retry::RetryPolicy, Client, Endpoint};
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    skopeo_push(
        &data.join("debian-zstd"),
        &format!("{}/ranges:1", reg.addr),
        None,
        false,
    );
    let client = Client::new(
        Endpoint::new(&reg.addr, false).unwrap(),
        "ranges",
        None,
        RetryPolicy::default(),
    );
    let blobs = data.join("debian-zstd/blobs/sha256");
    let biggest = fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let bytes = fs::read(&biggest).unwrap();
    let digest = Digest::parse(&format!(
        "sha256:{}",
        biggest.file_name().unwrap().to_str().unwrap()
    ))
    .unwrap();
    let n = bytes.len() as u64;
    for (off, len) in [(0, 1), (12_345, 100_000), (n - 10, 10), (n / 2, 4 << 20)] {
        let got = client.read_range(&digest, off, len).unwrap();
        assert!(
            got == bytes[off as usize..(off + len) as usize],
            "range {off}+{len}"
        );
    }
    assert_eq!(client.blob_size(&digest).unwrap(), Some(n));
    // Without range support the lazy path cannot work: a clear error, not wrong bytes.
    let plain = Proxy::start(&reg.addr, &["--no-ranges"]);
    let plain_client = Client::new(
        Endpoint::new(&plain.addr, false).unwrap(),
        "ranges",
        None,
        RetryPolicy::default(),
    );
    let err = plain_client
        .read_range(&digest, 10, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not serve byte ranges"), "{err}");
    let missing = Digest::sha256_of(b"not there");
    let err = client.read_range(&missing, 0, 10).unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn a_committed_image_pushed_and_pulled_has_the_change() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let local = tmp.path().join("local");
    ok(
        &local,
        &[
            "import",
            data.join("debian-gzip").to_str().unwrap(),
            "--name",
            "base",
        ],
    );
    let work = tmp.path().join("work");
    fs::create_dir_all(&work).unwrap();
    ok(&local, &["mount", "base", work.to_str().unwrap(), "--rw"]);
    fs::write(work.join("root/hello"), b"from a commit\n").unwrap();
    fs::remove_file(work.join("etc/issue")).unwrap();
    ok(&local, &["commit", work.to_str().unwrap(), "base:v2"]);
    ok(&local, &["umount", work.to_str().unwrap()]);
    let reference = format!("{}/committed:v2", reg.addr);
    let out = ok(&local, &["push", "base:v2", &reference]);
    assert!(out.contains("5 blobs uploaded"), "{out}");

    let root = tmp.path().join("root");
    ok(&root, &["pull", &reference, "--name", "v2"]);
    assert_eq!(
        identity(&inspect(&root, "v2")),
        identity(&inspect(&local, "base:v2"))
    );
    let mnt = tmp.path().join("mnt");
    let _m = Mounted::new(&root, "v2", &mnt);
    assert_eq!(
        fs::read(mnt.join("root/hello")).unwrap(),
        b"from a commit\n"
    );
    assert!(!mnt.join("etc/issue").exists());
    assert!(mnt.join("etc/os-release").exists() || mnt.join("usr/lib/os-release").exists());

    // The commit's zstd layer re-compressed on the way out: same diffIDs and chain, a new
    // manifest whose every layer is gzip, and the same tree when pulled back.
    let gz_ref = format!("{}/committed:v2-gzip", reg.addr);
    let out = ok(
        &local,
        &["push", "base:v2", &gz_ref, "--compression", "gzip"],
    );
    assert!(out.contains("re-compressed"), "{out}");
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{gz_ref}"))
        .output()
        .unwrap();
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    for l in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{manifest:#}"
        );
    }
    ok(&root, &["pull", &gz_ref, "--name", "v2gz"]);
    let (pushed, gz) = (inspect(&local, "base:v2"), inspect(&root, "v2gz"));
    assert_eq!(gz["RootFS"], pushed["RootFS"]);
    assert_eq!(gz["Snapshot"], pushed["Snapshot"]);
    assert_ne!(gz["Manifest"]["digest"], pushed["Manifest"]["digest"]);
    let mnt_gz = tmp.path().join("mnt-gz");
    let _m_gz = Mounted::new(&root, "v2gz", &mnt_gz);
    let diffs = common::compare_trees_with(&mnt_gz, &mnt, &Default::default());
    assert!(
        diffs.is_empty(),
        "gzip push pulled vs zstd push pulled: {diffs:#?}"
    );
}

#[test]
fn https_registry_with_its_ca_in_certs_d() {
    if !prerequisites() || !common::require(common::have_cmd("openssl"), "openssl") {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start_tls(&tmp.path().join("reg"));
    let certs_d = tmp.path().join("reg/certs.d");
    let reference = format!("{}/tls/debian:gzip", reg.addr);
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-cert-dir"])
        .arg(certs_d.join(&reg.addr))
        .arg(format!(
            "oci:{}:{}",
            data.join("debian-gzip").display(),
            common::TAG
        ))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = tmp.path().join("root");
    // Without the CA, a loopback registry is spoken to over HTTP: a clear hint.
    let nowhere = tmp.path().join("no-certs");
    let out = lazysnap_env(
        &root,
        &["pull", &reference],
        &[("LAZYSNAP_CERTS_D", &nowhere)],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("certs.d"), "{err}");
    // An HTTPS mirror whose CA is unknown is skipped (certificate error), the origin fails.
    let out = lazysnap_env(
        &root,
        &[
            "pull",
            &reference,
            "--mirror",
            &format!("https://{}", reg.addr),
        ],
        &[("LAZYSNAP_CERTS_D", &nowhere)],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("UnknownIssuer"),
        "{err}"
    );
    // With it: HTTPS, verified against that CA; push too.
    let env = [("LAZYSNAP_CERTS_D", certs_d.as_path())];
    ok_env(&root, &["pull", &reference, "--name", "t"], &env);
    ok_env(
        &root,
        &["push", "t", &format!("{}/tls/copy:1", reg.addr)],
        &env,
    );
}

#[test]
fn pull_applies_the_layer_size_limit() {
    if !prerequisites() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let reference = format!("{}/big:1", reg.addr);
    skopeo_push(&data.join("debian-zstd"), &reference, None, false);
    let root = tmp.path().join("root");
    let err = fails(&root, &["pull", &reference, "--max-layer-size", "1M"]);
    assert!(err.contains("decompression bomb"), "{err}");
    assert!(ok(&root, &["images", "--json"]).trim() == "[]");
    assert!(store_is_empty(&root), "a refused pull left files behind");
}

// ---- lazy pulls (`pull --lazy`, `index push`, chunk cache, traces) ----

/// `layout` pushed by skopeo as `repo` and given its index artifact by a builder root that
/// pulled it fully (`index push`). Returns the builder root.
fn push_with_index(tmp: &Path, reg: &Registry, layout: &str, repo: &str) -> PathBuf {
    let reference = format!("{}/{repo}", reg.addr);
    skopeo_push(&common::testdata().join(layout), &reference, None, false);
    let builder = tmp.join(format!("builder-{}", repo.replace([':', '/'], "-")));
    ok(&builder, &["pull", &reference]);
    let out = ok(&builder, &["index", "push", &reference]);
    assert!(out.contains("layers indexed"), "{out}");
    builder
}

/// Blob requests in a proxy log: (whole-blob GETs, Range GETs).
fn blob_requests(log: &Path) -> (Vec<String>, Vec<String>) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let blobs: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("GET ") && l.contains("/blobs/sha256:"))
        .collect();
    let (ranged, whole): (Vec<&str>, Vec<&str>) =
        blobs.into_iter().partition(|l| l.contains(" bytes="));
    (
        whole.into_iter().map(String::from).collect(),
        ranged.into_iter().map(String::from).collect(),
    )
}

/// Layer blobs (by hex) an image names.
fn layer_hexes(root: &Path, name: &str) -> Vec<String> {
    let v = inspect(root, name);
    v["Chain"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["blob"].as_str())
                .map(|d| d.trim_start_matches("sha256:").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn df_json(root: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(root, &["df", "--json"])).unwrap()
}

#[test]
fn lazy_pull_mounts_before_download_and_equals_umoci() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let builder = push_with_index(tmp.path(), &reg, "debian-gzip", "lazy/debian:gzip");
    let layers = layer_hexes(&builder, &format!("{}/lazy/debian:gzip", reg.addr));
    assert_eq!(layers.len(), 3, "{layers:?}");

    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    let reference = format!("{}/lazy/debian:gzip", proxy.addr);
    let node = tmp.path().join("node");
    let out = ok(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &reference,
            "--name",
            "lz",
        ],
    );
    assert!(out.contains("3 of 3 layers left in the registry"), "{out}");
    // Only manifests, the config and the small index artifact came over; no layer blob.
    let (whole, ranged) = blob_requests(&log);
    assert!(
        ranged.is_empty(),
        "range reads before any mount: {ranged:?}"
    );
    for l in &layers {
        assert!(
            !whole.iter().any(|w| w.contains(l)),
            "layer {l} downloaded: {whole:?}"
        );
        assert!(!node.join("content/blobs/sha256").join(l).exists());
    }
    // Same image as a full pull records.
    assert_eq!(
        identity(&inspect(&node, "lz")),
        identity(&inspect(
            &builder,
            &format!("{}/lazy/debian:gzip", reg.addr)
        ))
    );
    assert!(ok(&node, &["check"]).contains("consistent"));

    // The mount reads ranges on demand: the whole tree equals umoci's unpack.
    {
        let _m = Mounted::new(&node, "lz", &tmp.path().join("mnt"));
        let os = fs::read_to_string(tmp.path().join("mnt/etc/os-release")).unwrap();
        assert!(os.contains("ID="), "{os}");
        common::assert_trees_equal(
            &tmp.path().join("mnt"),
            &common::reference_tree(&data.join("debian-gzip"), common::TAG),
        );
    }
    let (whole, ranged) = blob_requests(&log);
    assert!(!ranged.is_empty(), "no range requests in the proxy log");
    for l in &layers {
        assert!(
            !whole.iter().any(|w| w.contains(l)),
            "layer {l} downloaded: {whole:?}"
        );
        assert!(!node.join("content/blobs/sha256").join(l).exists());
    }
    let df = df_json(&node);
    assert!(
        df["chunk_cache"]["bytes"].as_u64().unwrap() > 1 << 20,
        "{df}"
    );
    assert!(ok(&node, &["check"]).contains("consistent"));
    // Export needs the blobs: they are downloaded (digest checked), byte-identical.
    let out_dir = tmp.path().join("exported");
    ok(&node, &["export", "lz", out_dir.to_str().unwrap()]);
    for l in &layers {
        let ours = fs::read(out_dir.join("blobs/sha256").join(l)).unwrap();
        assert!(ours == fs::read(data.join("debian-gzip/blobs/sha256").join(l)).unwrap());
    }
    assert!(ok(&node, &["check", "--verify-digests"]).contains("consistent"));

    // Single-frame zstd layers cannot be entered mid-stream: their index is not pushed and a
    // lazy pull downloads them; the image is still complete and right.
    let zb = push_with_index(tmp.path(), &reg, "debian-zstd", "lazy/debian:zstd");
    let zref = format!("{}/lazy/debian:zstd", reg.addr);
    let out = ok(&zb, &["index", "push", &zref]);
    assert!(out.contains("only readable after download"), "{out}");
    let node2 = tmp.path().join("node2");
    ok(&node2, &["pull", "--lazy", &zref, "--name", "zs"]);
    let _m = Mounted::new(&node2, "zs", &tmp.path().join("mnt-zs"));
    common::assert_trees_equal(
        &tmp.path().join("mnt-zs"),
        &common::reference_tree(&data.join("debian-zstd"), common::TAG),
    );
}

#[test]
fn lazy_reads_survive_dropped_and_corrupted_range_answers() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    push_with_index(tmp.path(), &reg, "debian-gzip", "flaky/debian:gzip");
    // Every distinct range is first cut off halfway, then answered with a flipped byte,
    // then answered right: reads retry the range and reject the bad chunk by its sha256.
    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(
        &reg.addr,
        &[
            "--cut-ranges",
            "--corrupt-ranges",
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let node = tmp.path().join("node");
    ok(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &format!("{}/flaky/debian:gzip", proxy.addr),
            "--name",
            "fl",
        ],
    );
    let _m = Mounted::new(&node, "fl", &tmp.path().join("mnt"));
    common::assert_trees_equal(
        &tmp.path().join("mnt"),
        &common::reference_tree(&data.join("debian-gzip"), common::TAG),
    );
    let (_, ranged) = blob_requests(&log);
    let distinct: std::collections::HashSet<&String> = ranged.iter().collect();
    assert!(
        ranged.len() >= 3 * distinct.len(),
        "each range asked for at least three times: {} requests, {} distinct",
        ranged.len(),
        distinct.len()
    );
}

#[test]
fn chunk_cache_is_bounded_persistent_and_reused() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    push_with_index(tmp.path(), &reg, "debian-gzip", "cache/debian:gzip");
    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    let node = tmp.path().join("node");
    let reference = format!("{}/cache/debian:gzip", proxy.addr);
    ok(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &reference,
            "--name",
            "c",
        ],
    );
    let budget: u64 = 8 << 20;
    let mount = |dir: &str| {
        let d = tmp.path().join(dir);
        fs::create_dir_all(&d).unwrap();
        let out = Command::new(common::lazysnap_bin())
            .arg("--root")
            .arg(&node)
            .args(["mount", "c", d.to_str().unwrap()])
            .env("LAZYSNAP_CHUNK_CACHE_BYTES", budget.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted {
            root: node.clone(),
            dir: d,
        }
    };
    let hash_tree = |dir: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum")
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let python = "usr/bin/python3.11";
    let all = hash_tree(&mount("mnt1").dir);
    // The first mount's trace names every file: forget it, so the next mounts do not
    // prefetch the whole image through the small cache.
    ok(&node, &["trace", "c", "--reset"]);
    // Read by a new process last, so its chunks are the most recently used.
    let py = fs::read(mount("mnt1b").dir.join(python)).unwrap();
    // Over the whole 30+ MiB image the cache stayed within its budget.
    let cached = df_json(&node)["chunk_cache"]["bytes"].as_u64().unwrap();
    // (Chunks written by threads while another evicts may overshoot by a few.)
    assert!(
        cached <= budget + (1 << 20),
        "chunk cache holds {cached} bytes, budget {budget}"
    );
    assert!(cached > budget / 2, "chunk cache holds only {cached} bytes");
    // A new mount (a new process) reads python from the cache without asking the registry.
    let before = blob_requests(&log).1.len();
    {
        let m = mount("mnt2");
        assert!(fs::read(m.dir.join(python)).unwrap() == py);
    }
    assert_eq!(
        blob_requests(&log).1.len(),
        before,
        "python was fetched again"
    );
    // Evicted chunks are fetched again; the tree is the same.
    let m = mount("mnt3");
    assert_eq!(hash_tree(&m.dir), all);
    assert!(blob_requests(&log).1.len() > before);
}

#[test]
fn background_fetch_completes_the_blobs() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let builder = push_with_index(tmp.path(), &reg, "debian-gzip", "bg/debian:gzip");
    let reference = format!("{}/bg/debian:gzip", reg.addr);
    let layers = layer_hexes(&builder, &reference);
    let node = tmp.path().join("node");
    ok(&node, &["pull", "--lazy", &reference, "--name", "bg"]);
    let m = Mounted::new(&node, "bg", &tmp.path().join("mnt"));
    fs::read(m.dir.join("etc/os-release")).unwrap();
    let blobs = node.join("content/blobs/sha256");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Done when every blob is in the store and the chunks it replaces are gone.
    while !layers
        .iter()
        .all(|l| blobs.join(l).exists() && !node.join("chunks").join(l).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "layers not downloaded in the background within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Digest-checked blobs in the store; the chunks they replace are gone.
    let out = ok(&node, &["check", "--verify-digests"]);
    assert!(out.contains("consistent"), "{out}");
    for l in &layers {
        assert!(!node.join("chunks").join(l).exists(), "chunks of {l} kept");
    }
    common::assert_trees_equal(
        &m.dir,
        &common::reference_tree(&data.join("debian-gzip"), common::TAG),
    );
}

#[test]
fn trace_of_the_first_run_is_prefetched_by_later_pulls() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    let builder = push_with_index(tmp.path(), &reg, "debian-gzip", "tr/debian:gzip");
    let reference = format!("{}/tr/debian:gzip", reg.addr);
    let node = tmp.path().join("node");
    ok(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &reference,
            "--name",
            "t",
        ],
    );
    // The "container's" first run reads these, in this order.
    let read = [
        "/usr/share/lazysnap/os-release",
        "/usr/bin/python3.11",
        "/usr/bin/sort",
        "/usr/lib/python3.11/os.py",
    ];
    {
        let m = Mounted::new(&node, "t", &tmp.path().join("mnt"));
        for p in read {
            fs::read(m.dir.join(p.trim_start_matches('/'))).unwrap();
        }
        // The trace is written every second while mounted.
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
    let v: serde_json::Value = serde_json::from_str(&ok(&node, &["trace", "t", "--json"])).unwrap();
    let mut seen: Vec<String> = Vec::new();
    for layer in v.as_array().unwrap() {
        let files: Vec<String> = layer["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        // Within each layer, in the order read.
        let order: Vec<&str> = read
            .iter()
            .copied()
            .filter(|p| files.iter().any(|f| f == p))
            .collect();
        assert_eq!(files, order, "trace of layer {}", layer["layer"]);
        seen.extend(files);
    }
    seen.sort();
    let mut want: Vec<String> = read.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(seen, want, "traced files");

    // The trace travels with the index artifact (the builder ran the same image).
    for e in fs::read_dir(node.join("traces")).unwrap() {
        let e = e.unwrap();
        fs::create_dir_all(builder.join("traces")).unwrap();
        fs::copy(e.path(), builder.join("traces").join(e.file_name())).unwrap();
    }
    ok(&builder, &["index", "push", &reference]);

    // Another node's `pull --lazy --prefetch` fetches the traced ranges before it returns ...
    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    let remote = format!("{}/tr/debian:gzip", proxy.addr);
    let node2 = tmp.path().join("node2");
    let out = ok(
        &node2,
        &[
            "pull",
            "--lazy",
            "--prefetch",
            "--no-background-fetch",
            &remote,
            "--name",
            "t",
        ],
    );
    let (_, ranged) = blob_requests(&log);
    assert!(!ranged.is_empty(), "nothing prefetched: {out}");
    assert!(
        out.contains("prefetched for the recorded access trace"),
        "{out}"
    );
    // ... so the first run reads those files without asking the registry.
    let m = Mounted::new(&node2, "t", &tmp.path().join("mnt2"));
    for p in read {
        fs::read(m.dir.join(p.trim_start_matches('/'))).unwrap();
    }
    assert_eq!(
        blob_requests(&log).1.len(),
        ranged.len(),
        "traced files fetched again"
    );
    // What was not traced is fetched on demand.
    common::assert_trees_equal(
        &m.dir,
        &common::reference_tree(&common::testdata().join("debian-gzip"), common::TAG),
    );
    assert!(blob_requests(&log).1.len() > ranged.len());
    drop(m);

    // Without --prefetch the pull returns at once and the mount fetches the traced ranges
    // first thing, in parallel.
    fs::remove_file(&log).unwrap();
    let node3 = tmp.path().join("node3");
    let out = ok(
        &node3,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &remote,
            "--name",
            "t",
        ],
    );
    assert!(!out.contains("prefetched"), "{out}");
    assert!(blob_requests(&log).1.is_empty());
    let m = Mounted::new(&node3, "t", &tmp.path().join("mnt3"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = usize::MAX;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let n = blob_requests(&log).1.len();
        if n > 0 && n == last {
            break;
        }
        last = n;
        assert!(
            std::time::Instant::now() < deadline,
            "the prefetch did not settle"
        );
    }
    for p in read {
        fs::read(m.dir.join(p.trim_start_matches('/'))).unwrap();
    }
    assert_eq!(
        blob_requests(&log).1.len(),
        last,
        "traced files fetched again"
    );
}

#[test]
fn lazy_pull_with_basic_auth_reads_with_the_callers_credentials() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), Some("lazy:secret"));
    let reference = format!("{}/auth/debian:gzip", reg.addr);
    skopeo_push(
        &common::testdata().join("debian-gzip"),
        &reference,
        Some("lazy:secret"),
        false,
    );
    let cfg = docker_config(&tmp.path().join("docker"), &reg.addr, "lazy:secret");
    let env = [("DOCKER_CONFIG", cfg.as_path())];
    let builder = tmp.path().join("builder");
    let run = |root: &Path, args: &[&str]| ok_env(root, args, &env);
    run(&builder, &["pull", &reference]);
    run(&builder, &["index", "push", &reference]);
    let node = tmp.path().join("node");
    // Without credentials the registry refuses.
    assert!(!lazysnap(&node, &["pull", "--lazy", &reference])
        .status
        .success());
    let out = run(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &reference,
            "--name",
            "a",
        ],
    );
    assert!(out.contains("3 of 3 layers left"), "{out}");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    run(&node, &["mount", "a", mnt.to_str().unwrap()]);
    let _m = Mounted {
        root: node.clone(),
        dir: mnt.clone(),
    };
    let py = fs::read(mnt.join("usr/bin/python3.11")).unwrap();
    let refs = common::reference_tree(&common::testdata().join("debian-gzip"), common::TAG);
    assert!(py == fs::read(refs.join("usr/bin/python3.11")).unwrap());
}

/// Differences left once mtimes that an eStargz TOC can only give in whole seconds are set
/// aside (the expected time has a fraction and lies within a second of the actual one).
fn beyond_toc_precision(diffs: Vec<String>) -> Vec<String> {
    let parse = |t: &str| -> Option<(i64, i64)> {
        let (s, n) = t.trim().split_once('.')?;
        Some((s.parse().ok()?, n.parse().ok()?))
    };
    diffs
        .into_iter()
        .filter(|d| {
            let Some((_, rest)) = d.split_once(": mtime: actual ") else {
                return true;
            };
            let Some((a, e)) = rest.split_once(", expected ") else {
                return true;
            };
            match (parse(a), parse(e)) {
                (Some(a), Some(e)) => {
                    let ns = |t: (i64, i64)| i128::from(t.0) * 1_000_000_000 + i128::from(t.1);
                    !(e.1 != 0 && a.1 == 0 && (ns(a) - ns(e)).abs() < 1_000_000_000)
                }
                _ => true,
            }
        })
        .collect()
}

#[test]
fn estargz_layers_are_read_by_their_toc_without_an_artifact() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    for (layout, repo) in [("debian-estargz", "es/debian"), ("edge-estargz", "es/edge")] {
        let image = common::testdata().join(layout);
        skopeo_push(&image, &format!("{}/{repo}:1", reg.addr), None, false);
        let log = tmp.path().join(format!("{layout}.log"));
        let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
        let node = tmp.path().join(format!("node-{layout}"));
        let reference = format!("{}/{repo}:1", proxy.addr);
        // No `index push`: the TOCs are the index.
        let out = ok(
            &node,
            &[
                "pull",
                "--lazy",
                "--no-background-fetch",
                &reference,
                "--name",
                "es",
            ],
        );
        let v = inspect(&node, "es");
        let n = v["Chain"].as_array().unwrap().len();
        assert!(
            out.contains(&format!("{n} of {n} layers left in the registry")),
            "{out}"
        );
        let (whole, _) = blob_requests(&log);
        for l in layer_hexes(&node, "es") {
            assert!(
                !whole.iter().any(|w| w.contains(&l)),
                "{l} downloaded: {whole:?}"
            );
        }
        let mnt = tmp.path().join(format!("mnt-{layout}"));
        let _m = Mounted::new(&node, "es", &mnt);
        let reference = common::reference_tree(&image, common::TAG);
        let mut opts = common::CompareOptions::for_reference(&reference);
        // umoci leaves /dup with its unpack time (estargz put dup/d/child before dup/d).
        opts.ignore_mtime.insert(PathBuf::from("dup"));
        let diffs = beyond_toc_precision(common::compare_trees_with(&mnt, &reference, &opts));
        assert!(
            diffs.is_empty(),
            "{layout}: {} differences: {:#?}",
            diffs.len(),
            &diffs[..diffs.len().min(40)]
        );
        let (whole, ranged) = blob_requests(&log);
        assert!(!ranged.is_empty());
        for l in layer_hexes(&node, "es") {
            assert!(
                !whole.iter().any(|w| w.contains(&l)),
                "{l} downloaded: {whole:?}"
            );
        }
        assert!(ok(&node, &["check"]).contains("consistent"));
    }

    // A chunk that fails its chunkDigest is fetched again; the tree is still right.
    let image = common::testdata().join("debian-estargz");
    let proxy = Proxy::start(&reg.addr, &["--corrupt-ranges"]);
    let node = tmp.path().join("node-corrupt");
    let out = ok(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &format!("{}/es/debian:1", proxy.addr),
            "--name",
            "es",
        ],
    );
    assert!(out.contains("3 of 3 layers left in the registry"), "{out}");
    let mnt = tmp.path().join("mnt-corrupt");
    let _m = Mounted::new(&node, "es", &mnt);
    let diffs = beyond_toc_precision(common::compare_trees(
        &mnt,
        &common::reference_tree(&image, common::TAG),
    ));
    assert!(diffs.is_empty(), "{:#?}", &diffs[..diffs.len().min(40)]);
}

#[test]
fn zstd_chunked_layers_are_read_by_their_toc_without_an_artifact() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // containers/image (skopeo) writes the zstd:chunked layers and their TOC annotations.
    // (skopeo 1.9 leaves the config's diff_ids those of the gzip image, so only a reader of
    // the TOC can take this image; the tree is the gzip image's.)
    let layout = tmp.path().join("zchunked");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-compress-format", "zstd:chunked"])
        .arg(format!(
            "oci:{}:{}",
            common::testdata().join("debian-gzip").display(),
            common::TAG
        ))
        .arg(format!("oci:{}:{}", layout.display(), common::TAG))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reg = Registry::start(&tmp.path().join("reg"), None);
    skopeo_push(&layout, &format!("{}/zc/debian:1", reg.addr), None, false);
    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(&reg.addr, &["--log", log.to_str().unwrap()]);
    let node = tmp.path().join("node");
    let out = ok(
        &node,
        &[
            "pull",
            "--lazy",
            "--no-background-fetch",
            &format!("{}/zc/debian:1", proxy.addr),
            "--name",
            "zc",
        ],
    );
    assert!(out.contains("3 of 3 layers left in the registry"), "{out}");
    let mnt = tmp.path().join("mnt");
    let _m = Mounted::new(&node, "zc", &mnt);
    common::assert_trees_equal(
        &mnt,
        &common::reference_tree(&common::testdata().join("debian-gzip"), common::TAG),
    );
    let (whole, ranged) = blob_requests(&log);
    assert!(!ranged.is_empty());
    for l in layer_hexes(&node, "zc") {
        assert!(
            !whole.iter().any(|w| w.contains(&l)),
            "{l} downloaded: {whole:?}"
        );
    }
    assert!(ok(&node, &["check"]).contains("consistent"));
}

/// Reads while the background download runs fetch no byte twice: chunks the download fetched
/// are cached for reads, and a chunk in flight in one is waited for by the other. Through a
/// 4 MB/s link, the whole tree is read once the download is under way; what crossed the link
/// is the layers' bytes and at most 2% more.
#[test]
fn reads_during_the_background_download_fetch_no_byte_twice() {
    if !prerequisites() || !common::can_mount() {
        return;
    }
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), None);
    push_with_index(tmp.path(), &reg, "debian-gzip", "once/debian:gzip");
    let log = tmp.path().join("proxy.log");
    let proxy = Proxy::start(
        &reg.addr,
        &["--rate", "4000000", "--log", log.to_str().unwrap()],
    );
    let reference = format!("{}/once/debian:gzip", proxy.addr);
    let (sizes, _, _) = common::registry::layout_layers(&data.join("debian-gzip"));
    let total: u64 = sizes.values().sum();
    let node = tmp.path().join("node");
    ok(&node, &["pull", "--lazy", &reference, "--name", "once"]);
    let m = Mounted::new(&node, "once", &tmp.path().join("mnt"));
    // The download starts once reads have been quiet for a while; let it get ahead.
    std::thread::sleep(std::time::Duration::from_secs(4));
    common::assert_trees_equal(
        &m.dir,
        &common::reference_tree(&data.join("debian-gzip"), common::TAG),
    );
    let blobs = node.join("content/blobs/sha256");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !sizes
        .keys()
        .all(|d| blobs.join(d.trim_start_matches("sha256:")).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not downloaded within 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (whole, ranged) = common::registry::fetched(&proxy.take_requests(), &sizes);
    assert!(whole.is_empty(), "whole-blob GETs: {whole:?}");
    // Before the download cached what it fetched, reads fetched it again: 50.0 MB crossed for
    // 36.9 MB of layers. Left: a read and the download may still take one 256 KiB chunk at a
    // blob's end each (37.4 MB).
    assert!(
        ranged <= total + total / 50,
        "{ranged} layer bytes crossed the link for {total} bytes of layers"
    );
}
