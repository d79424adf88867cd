//! A registry for tests: Debian's docker-registry on loopback (scripts/registry-env.sh) and
//! scripts/registry-proxy.py in front of it (faults, throttling, a request log).

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{ok, scripts_dir, TAG};

/// A registry that is stopped when dropped.
pub struct Registry {
    pub dir: PathBuf,
    pub addr: String,
}

impl Registry {
    /// Plain HTTP; with `user_pass`, HTTP Basic auth (htpasswd).
    pub fn start(dir: &Path, user_pass: Option<&str>) -> Registry {
        Self::start_with(dir, user_pass, false)
    }

    /// HTTPS with a CA of its own, in `dir/certs.d/ADDR/ca.crt`.
    pub fn start_tls(dir: &Path) -> Registry {
        Self::start_with(dir, None, true)
    }

    fn start_with(dir: &Path, user_pass: Option<&str>, tls: bool) -> Registry {
        let mut cmd = Command::new("bash");
        cmd.env("TLS", if tls { "1" } else { "0" });
        cmd.arg(scripts_dir().join("registry-env.sh"))
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
            .arg(scripts_dir().join("registry-env.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// scripts/registry-proxy.py in front of `upstream`, killed when dropped.
pub struct Proxy {
    child: Child,
    pub addr: String,
    log: Option<PathBuf>,
}

/// One request of the proxy's log.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// `(first, last)` byte of a `Range: bytes=first-last` header.
    pub range: Option<(u64, Option<u64>)>,
}

impl Proxy {
    /// With the proxy's options `args` (`--log FILE` among them, if wanted).
    pub fn start(upstream: &str, args: &[&str]) -> Proxy {
        let log = args
            .iter()
            .position(|a| *a == "--log")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from);
        let mut child = Command::new("python3")
            .arg(scripts_dir().join("registry-proxy.py"))
            .arg(upstream)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting registry-proxy.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("proxy stdout"))
            .read_line(&mut line)
            .expect("reading the proxy's port");
        let port: u16 = line.trim().parse().expect("proxy port");
        Proxy {
            child,
            addr: format!("127.0.0.1:{port}"),
            log,
        }
    }

    /// The requests logged so far.
    pub fn requests(&self) -> Vec<Request> {
        let body = self
            .log
            .as_ref()
            .and_then(|l| fs::read_to_string(l).ok())
            .unwrap_or_default();
        body.lines()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                let (method, path, range) = (parts.next()?, parts.next()?, parts.next()?);
                let range = range.strip_prefix("bytes=").and_then(|r| {
                    let (a, b) = r.split_once('-')?;
                    Some((a.parse().ok()?, b.parse().ok()))
                });
                Some(Request {
                    method: method.to_string(),
                    path: path.to_string(),
                    range,
                })
            })
            .collect()
    }

    /// The requests logged since the last call (the log is emptied).
    pub fn take_requests(&self) -> Vec<Request> {
        let r = self.requests();
        if let Some(l) = &self.log {
            fs::write(l, "").expect("emptying the proxy log");
        }
        r
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// skopeo copy of an OCI layout's `latest` (`all`: every platform of an index).
pub fn skopeo_push(layout: &Path, dest: &str, creds: Option<&str>, all: bool) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    let out = cmd
        .arg(format!("oci:{}:{}", layout.display(), TAG))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("running skopeo");
    assert!(
        out.status.success(),
        "skopeo copy to {dest} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the requests fetched of the blobs in `sizes`: (whole-blob GETs, bytes by range).
pub fn fetched(requests: &[Request], sizes: &HashMap<String, u64>) -> (Vec<String>, u64) {
    let mut whole = Vec::new();
    let mut ranged = 0;
    for r in requests.iter().filter(|r| r.method == "GET") {
        let Some((_, digest)) = r.path.rsplit_once("/blobs/") else {
            continue;
        };
        let Some(size) = sizes.get(digest) else {
            continue;
        };
        match r.range {
            None => whole.push(digest.to_string()),
            Some((a, b)) => ranged += b.map_or(*size, |b| b.min(size - 1) + 1) - a,
        }
    }
    (whole, ranged)
}

/// The layer blobs of the single-manifest OCI layout `layout`: digest → size, and the
/// manifest's and config's digests.
pub fn layout_layers(layout: &Path) -> (HashMap<String, u64>, String, String) {
    let read = |d: &str| -> serde_json::Value {
        let hex = d.strip_prefix("sha256:").unwrap_or(d);
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = read(&manifest_digest);
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    (layers, manifest_digest, config)
}

/// The registry with `layout` pushed as `repo:tag` (skopeo), and with `indexed` its lazysnap
/// index artifact pushed from a builder root (full pull, then `index push`).
pub fn publish(
    reg: &Registry,
    work: &Path,
    layout: &Path,
    repo_tag: &str,
    indexed: bool,
) -> String {
    let reference = format!("{}/{repo_tag}", reg.addr);
    skopeo_push(layout, &reference, None, false);
    if indexed {
        let builder = work.join("builder");
        ok(&builder, &["pull", &reference]);
        let out = ok(&builder, &["index", "push", &reference]);
        assert!(out.contains("3 layers indexed"), "{out}");
    }
    reference
}
