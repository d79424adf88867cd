//! [registry] pull and push against a real registry (Debian's docker-registry, distribution
//! 2.8, started by scripts/registry-env.sh on 127.0.0.1): images pushed by skopeo and by
//! `lazysnap push`, pulled by `lazysnap pull`, mounted and compared with umoci's unpack;
//! Basic auth (htpasswd + docker config.json), the Bearer token flow, a dropped connection
//! resumed with a Range request, a corrupted blob rejected, platform choice from an index.
//! Proxied cases run scripts/registry-proxy.py between lazysnap and the registry.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{fails, lazysnap, ok};

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

/// A registry that is stopped when dropped.
struct Registry {
    dir: PathBuf,
    addr: String,
}

impl Registry {
    fn start(dir: &Path, user_pass: Option<&str>) -> Registry {
        Self::start_with(dir, user_pass, false)
    }

    /// HTTPS with a CA of its own, in `dir/certs.d/ADDR/ca.crt`.
    fn start_tls(dir: &Path) -> Registry {
        Self::start_with(dir, None, true)
    }

    fn start_with(dir: &Path, user_pass: Option<&str>, tls: bool) -> Registry {
        let mut cmd = Command::new("bash");
        cmd.env("TLS", if tls { "1" } else { "0" });
        cmd.arg(common::scripts_dir().join("registry-env.sh"))
            .arg("start")
            .arg(dir);
        if let Some(up) = user_pass {
            cmd.arg(up);
        }
        let out = cmd.output().expect("running registry-env.sh");
        assert!(
            out.status.success(),
            "registry-env.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Registry {
            dir: dir.to_path_buf(),
            addr,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(common::scripts_dir().join("registry-env.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// scripts/registry-proxy.py in front of `upstream`, killed when dropped.
struct Proxy {
    child: Child,
    addr: String,
}

impl Proxy {
    fn start(upstream: &str, args: &[&str]) -> Proxy {
        let mut child = Command::new("python3")
            .arg(common::scripts_dir().join("registry-proxy.py"))
            .arg(upstream)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting registry-proxy.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("proxy port");
        Proxy {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mount that is unmounted when dropped.
struct Mounted {
    root: PathBuf,
    dir: PathBuf,
}

impl Mounted {
    fn new(root: &Path, image: &str, dir: &Path) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        ok(root, &["mount", image, dir.to_str().unwrap()]);
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

/// skopeo copy of an OCI layout (`--all` keeps every platform of an index).
fn skopeo_push(layout: &Path, dest: &str, creds: Option<&str>, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    let out = cmd
        .arg(format!("oci:{}:{}", layout.display(), common::TAG))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo copy to {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = lazysnap_env(&root, &["pull", &reference], &[("DOCKER_CONFIG", &right)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Push with the same credentials.
    let out = lazysnap_env(
        &root,
        &["push", &reference, &format!("{}/auth/copy:1", reg.addr)],
        &[("DOCKER_CONFIG", &right)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
    let out = lazysnap_env(
        &root,
        &["pull", &format!("{}/tok:1", anon.addr)],
        &[("DOCKER_CONFIG", &none)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
    let out = lazysnap_env(&root2, &["pull", &reference], &[("DOCKER_CONFIG", &right)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And push through the token flow (scope pull,push).
    let out = lazysnap_env(
        &root2,
        &["push", &reference, &format!("{}/tok-copy:1", private.addr)],
        &[("DOCKER_CONFIG", &right)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
    let out = lazysnap_env(&root, &["pull", &reference, "--name", "t"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lazysnap_env(
        &root,
        &["push", "t", &format!("{}/tls/copy:1", reg.addr)],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
