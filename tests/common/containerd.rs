//! A private containerd + `lazysnap serve` for tests (scripts/containerd-env.sh: its own
//! root, state and socket under one directory), stopped and removed when dropped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{lazysnap_bin, scripts_dir, testdata, FileLock};

/// Seconds any one command may take before it is killed (a hung containerd fails the test).
pub const CMD_TIMEOUT: u64 = 300;

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `prog args` with extra environment, killed after [`CMD_TIMEOUT`].
pub fn run_timeout(prog: &str, args: &[&str], envs: &[(&str, OsString)]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("-k")
        .arg("10")
        .arg(CMD_TIMEOUT.to_string())
        .arg(prog)
        .args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Its stdout, or a panic showing both outputs.
pub fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub struct ContainerdEnv {
    pub dir: PathBuf,
    /// The `ctr` of this containerd (containerd 2.x's own, or Debian's on PATH).
    ctr: PathBuf,
    /// Environment of every containerd-env.sh call (LAZYSNAP_BIN among it).
    env: Vec<(&'static str, OsString)>,
    _lock: FileLock,
}

impl ContainerdEnv {
    /// Starts one under `/tmp/lzs-<tag>-…` with `env` for containerd-env.sh (e.g.
    /// `LAZYSNAP_SERVE_ARGS`).
    pub fn start(tag: &str, env: &[(&'static str, OsString)]) -> ContainerdEnv {
        Self::start_with(tag, env, None)
    }

    /// As [`ContainerdEnv::start`], on containerd 2.x (scripts/install-containerd2.sh).
    pub fn start_v2(tag: &str, env: &[(&'static str, OsString)]) -> ContainerdEnv {
        Self::start_with(tag, env, Some(containerd2_bin_dir()))
    }

    fn start_with(
        tag: &str,
        env: &[(&'static str, OsString)],
        bin_dir: Option<PathBuf>,
    ) -> ContainerdEnv {
        static N: AtomicUsize = AtomicUsize::new(0);
        // Two containerds at once would fight over two cores: one environment at a time.
        let lock = FileLock::acquire(&testdata().join(".containerd.lock"));
        // Short: unix socket paths are limited to 108 bytes.
        let dir = PathBuf::from(format!(
            "/tmp/lzs-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut all = vec![("LAZYSNAP_BIN", lazysnap_bin().into_os_string())];
        let ctr = match &bin_dir {
            Some(b) => {
                all.push(("CONTAINERD_BIN_DIR", b.clone().into_os_string()));
                b.join("ctr")
            }
            None => PathBuf::from("ctr"),
        };
        all.extend(env.iter().cloned());
        let e = ContainerdEnv {
            dir,
            ctr,
            env: all,
            _lock: lock,
        };
        e.script(&["stop"]); // leftovers of an earlier run with the same pid
        let _ = std::fs::remove_dir_all(&e.dir);
        let out = e.script(&["start"]);
        if !out.status.success() {
            e.dump_logs();
        }
        check("containerd-env.sh start", out);
        e
    }

    /// containerd-env.sh ARGS... DIR.
    pub fn script(&self, args: &[&str]) -> Output {
        let script = scripts_dir().join("containerd-env.sh");
        let mut all = vec![script.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        all.push(self.dir.to_str().expect("utf-8 path"));
        run_timeout("bash", &all, &self.env)
    }

    /// The last lines of containerd's, the server's and the mount daemons' logs, to stderr.
    pub fn dump_logs(&self) {
        for log in ["containerd.log", "lazysnap.log", "lazysnap/logs/mount.log"] {
            let body = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(40).collect();
            eprintln!("--- last lines of {log}:");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr -a SOCKET -n NS ARGS`.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> Output {
        let sock = self.socket();
        let mut all = vec!["-a", sock.to_str().expect("utf-8 path"), "-n", ns];
        all.extend_from_slice(args);
        run_timeout(self.ctr.to_str().expect("utf-8 path"), &all, &[])
    }

    /// The digests in containerd's content store for namespace `ns`.
    pub fn content_digests(&self, ns: &str) -> std::collections::BTreeSet<String> {
        self.ctr_ok(ns, &["content", "ls", "-q"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// [`ContainerdEnv::ctr`]'s stdout; logs and a panic when it fails.
    pub fn ctr_ok(&self, ns: &str, args: &[&str]) -> String {
        let out = self.ctr(ns, args);
        if !out.status.success() {
            self.dump_logs();
        }
        check(&format!("ctr {args:?}"), out)
    }
}

/// Points `DOCKER_CONFIG` at an empty directory, once per test binary: no one (lazysnap, the
/// servers the environments start, Go clients) reads the machine's `~/.docker/config.json`.
pub fn hermetic_docker_config() {
    static EMPTY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("lazysnap-docker-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("creating an empty DOCKER_CONFIG");
        std::env::set_var("DOCKER_CONFIG", &d);
        d
    });
}

/// What a containerd 2.x environment with a loopback registry needs (CI=true: missing = failure).
pub fn containerd2_prerequisites() -> bool {
    use super::{have_cmd, have_dev_fuse, is_root, require};
    hermetic_docker_config();
    require(is_root(), "root (containerd, FUSE mounts)")
        && require(have_dev_fuse(), "/dev/fuse")
        && require(have_cmd("runc"), "runc (apt-get install runc)")
        && require(have_cmd("timeout"), "timeout (coreutils)")
        && require(
            have_cmd("go"),
            "go on PATH (builds containerd 2.x and the peers: scripts/install-*.sh)",
        )
        && require(
            have_cmd("docker-registry"),
            "docker-registry (scripts/install-deps.sh)",
        )
        && require(have_cmd("skopeo"), "skopeo (scripts/install-deps.sh)")
}

/// containerd 2.x's bin directory, built once (scripts/install-containerd2.sh: from its Go
/// module; a no-op when that version is installed).
pub fn containerd2_bin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = scripts_dir().join("install-containerd2.sh");
        let out = run_timeout("bash", &[script.to_str().expect("utf-8 path")], &[]);
        let stdout = check("scripts/install-containerd2.sh", out);
        PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
    })
    .clone()
}

/// The bin directories of nerdctl, the CNI plugins and crictl, built once
/// (scripts/install-peers.sh; a no-op when those versions are installed).
pub struct CriTools {
    pub nerdctl: PathBuf,
    pub cni: PathBuf,
    pub crictl: PathBuf,
}

pub fn cri_tools() -> &'static CriTools {
    static TOOLS: std::sync::OnceLock<CriTools> = std::sync::OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = scripts_dir().join("install-peers.sh");
        let out = run_timeout(
            "bash",
            &[
                script.to_str().expect("utf-8 path"),
                "nerdctl",
                "cni-plugins",
                "crictl",
            ],
            &[],
        );
        let stdout = check("scripts/install-peers.sh", out);
        let dir = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("install-peers.sh printed no {name}=: {stdout}"))
        };
        CriTools {
            nerdctl: dir("NERDCTL").join("nerdctl"),
            cni: dir("CNI_PLUGINS"),
            crictl: dir("CRICTL").join("crictl"),
        }
    })
}

impl Drop for ContainerdEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let out = self.script(&["stop"]);
        if !out.status.success() {
            eprintln!("containerd-env.sh stop failed: {}", text(&out.stderr));
            return;
        }
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(self.dir.to_str().unwrap_or("/nonexistent"));
        if mounted {
            eprintln!(
                "mounts are left under {}; not removing it",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every committed snapshot of the import is made of a layer blob of containerd's own content
/// store — indexed, not extracted and tarred again (a commit of an extracted upper would make a
/// new blob that only lazysnap's store has) — and no snapshot upper holds files.
pub fn assert_imported_without_extraction(env_dir: &Path, archive: &str) {
    let root = lazysnap::root::Root::open(&env_dir.join("lazysnap")).unwrap();
    let content = env_dir.join("root/io.containerd.content.v1.content/blobs/sha256");
    let snaps = root.meta.snapshots().unwrap();
    let committed: Vec<_> = snaps.iter().filter(|s| s.kind == "committed").collect();
    assert!(
        committed.len() >= 3,
        "{archive}: {} committed snapshots",
        committed.len()
    );
    for s in committed {
        let chain = root
            .meta
            .chain(s.chain_id.as_deref().unwrap())
            .unwrap()
            .unwrap();
        let digest = lazysnap::digest::Digest::parse(&chain.blob_digest).unwrap();
        assert!(
            content.join(digest.hex()).is_file(),
            "{archive}: snapshot {} is made of blob {} that containerd does not have: it was extracted and re-tarred",
            s.key,
            chain.blob_digest
        );
    }
    for entry in std::fs::read_dir(env_dir.join("lazysnap/snapshots"))
        .unwrap()
        .flatten()
    {
        let upper = entry.path().join("upper");
        if upper.is_dir() {
            assert_eq!(
                std::fs::read_dir(&upper).unwrap().count(),
                0,
                "{}",
                upper.display()
            );
        }
    }
}
