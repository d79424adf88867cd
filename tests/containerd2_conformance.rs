//! containerd 2.x's snapshotter conformance suite (`core/snapshots/testsuite` of the module
//! version pinned in tests/conformance2/go.mod, the one scripts/install-containerd2.sh builds)
//! against this build's `lazysnap serve`, through containerd 2.x's proxy client, in both upper
//! modes; plus our TestRenameNonEmptyLower (tests/conformance2/rename_test.go).
//!
//! The suite needs containerd's Go libraries only, not its binaries: `go` (>= the go.mod's
//! `go` line) and the Go module proxy on the first run. Modules and the build cache persist
//! under target/ (target/go-mod-cache, target/go-build-cache), so a rerun compiles nothing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The `go` line of tests/conformance2/go.mod: the oldest Go that builds containerd 2.x.
const GO_MIN: (u32, u32, u32) = (1, 26, 6);

/// Every test of containerd 2.x's `SnapshotterSuite`; each must pass, none may be skipped.
const SUITE: &[&str] = &[
    "Basic",
    "StatActive",
    "StatComitted",
    "TransitivityTest",
    "PreareViewFailingtest",
    "Update",
    "Remove",
    "Walk",
    "LayerFileupdate",
    "RemoveDirectoryInLowerLayer",
    "Chown",
    "DirectoryPermissionOnCommit",
    "RemoveIntermediateSnapshot",
    "DeletedFilesInChildSnapshot",
    "MoveFileFromLowerLayer",
    "ViewReadonly",
    "StatInWalk",
    "CloseTwice",
    "RootPermission",
    "Rename",
    "128LayersMount",
];

#[test]
fn containerd2_conformance_suite_in_overlay_mode() {
    conformance2_suite("overlay");
}

#[test]
fn containerd2_conformance_suite_in_fuse_mode() {
    conformance2_suite("fuse");
}

/// The Go on PATH, as (major, minor, patch), when it runs.
fn go_version() -> Option<(u32, u32, u32)> {
    let out = Command::new("go")
        .args(["env", "GOVERSION"])
        .env("GOTOOLCHAIN", "local")
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    let mut parts = v
        .trim()
        .strip_prefix("go")?
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    Some((
        parts.next()?,
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    ))
}

fn conformance2_suite(mode: &str) {
    if !(common::require(
        common::is_root(),
        "root (FUSE mounts; the suite mounts bind and overlay mounts)",
    ) && common::require(common::have_dev_fuse(), "/dev/fuse"))
    {
        return;
    }
    // The same lock as tests/serve.rs's 1.6 suite: one conformance run at a time.
    let _turn = common::FileLock::acquire(&std::env::temp_dir().join("lazysnap-conformance.lock"));
    let go = go_version();
    if !common::require(
        go.is_some_and(|v| v >= GO_MIN),
        &format!(
            "go >= {}.{}.{} on PATH (found {go:?}; containerd 2.x's go.mod line)",
            GO_MIN.0, GO_MIN.1, GO_MIN.2
        ),
    ) {
        return;
    }
    let target = common::repo_root().join("target");
    let cache = std::env::var_os("GOCACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("go-build-cache"));
    let modcache = std::env::var_os("GOMODCACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("go-mod-cache"));
    let logs_dir = tempfile::tempdir().unwrap();
    let logs = logs_dir.path().join("logs");
    let start = Instant::now();
    let out = Command::new("go")
        .args(["test", "-count=1", "-v", "-timeout", "15m", "."])
        .current_dir(common::repo_root().join("tests/conformance2"))
        .env("GO111MODULE", "on")
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", &cache)
        .env("GOMODCACHE", &modcache)
        // Writable module files, so `rm -rf target` / `cargo clean` works for anyone.
        .env("GOFLAGS", "-modcacherw -buildvcs=false -mod=readonly")
        .env("LAZYSNAP_BIN", env!("CARGO_BIN_EXE_lazysnap"))
        .env("LAZYSNAP_CONFORMANCE_LOGS", &logs)
        .env("LAZYSNAP_UPPER", mode)
        .output()
        .expect("running go test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("--- "))
        .collect();
    eprintln!(
        "go test (containerd 2.x suite, {mode} upper) took {:.1}s:\n{}",
        start.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    if !out.status.success() {
        panic!(
            "containerd 2.x's conformance suite failed ({mode} upper):\n{stdout}\n{stderr}\n\
             server logs with warnings:\n{}",
            logs_with_warnings(&logs)
        );
    }
    // The suite's own skips are for Windows only: nothing may be skipped here.
    for l in &summary {
        assert!(!l.contains("--- SKIP"), "unexpected skip: {l}\n{stdout}");
    }
    let passed = |name: &str| {
        summary
            .iter()
            .any(|l| l.contains("--- PASS") && l.contains(&format!("{name} ")))
    };
    for t in SUITE {
        let name = format!("TestSnapshotterSuite/{t}");
        assert!(passed(&name), "{name} did not pass:\n{stdout}");
    }
    assert!(
        passed("TestRenameNonEmptyLower"),
        "TestRenameNonEmptyLower did not pass:\n{stdout}"
    );
}

/// The serve logs that hold a warning or an error, each headed by its path.
fn logs_with_warnings(dir: &Path) -> String {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            format!(
                "== {}\n{}",
                e.path().display(),
                fs::read_to_string(e.path()).unwrap_or_default()
            )
        })
        .filter(|s| s.contains("ERROR") || s.contains("WARN"))
        .collect()
}
