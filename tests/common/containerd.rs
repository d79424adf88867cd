//! A private containerd + `lazysnap serve` for tests (scripts/containerd-env.sh: its own
//! root, state and socket under one directory), stopped and removed when dropped.

use std::ffi::OsString;
use std::path::PathBuf;
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
    /// Environment of every containerd-env.sh call (LAZYSNAP_BIN among it).
    env: Vec<(&'static str, OsString)>,
    _lock: FileLock,
}

impl ContainerdEnv {
    /// Starts one under `/tmp/lzs-<tag>-…` with `env` for containerd-env.sh (e.g.
    /// `LAZYSNAP_SERVE_ARGS`).
    pub fn start(tag: &str, env: &[(&'static str, OsString)]) -> ContainerdEnv {
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
        all.extend(env.iter().cloned());
        let e = ContainerdEnv {
            dir,
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
        run_timeout("ctr", &all, &[])
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
