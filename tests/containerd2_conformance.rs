//! containerd 2.x's snapshotter conformance suite (`core/snapshots/testsuite` of the module
//! version pinned in tests/conformance2/go.mod, the one scripts/install-containerd2.sh builds)
//! against this build's `lazysnap serve`, through containerd 2.x's proxy client, in both upper
//! modes; plus our TestRenameNonEmptyLower (tests/conformance2/rename_test.go).
//!
//! The suite needs containerd's Go libraries only, not its binaries: `go` (>= the go.mod's
//! `go` line) and the Go module proxy on the first run. Modules and the build cache persist
//! under target/ (target/go-mod-cache, target/go-build-cache), so a rerun compiles nothing.

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

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
    let run = common::run_go_suite(
        &format!("containerd 2.x's conformance suite, {mode} upper"),
        &common::repo_root().join("tests/conformance2"),
        &[
            ("GO111MODULE", OsStr::new("on")),
            ("GOTOOLCHAIN", OsStr::new("local")),
            ("GOCACHE", cache.as_os_str()),
            ("GOMODCACHE", modcache.as_os_str()),
            // Writable module files, so `rm -rf target` / `cargo clean` works for anyone.
            (
                "GOFLAGS",
                OsStr::new("-modcacherw -buildvcs=false -mod=readonly"),
            ),
            ("LAZYSNAP_UPPER", OsStr::new(mode)),
        ],
    );
    let stdout = &run.stdout;
    let summary = &run.summary;
    // The suite's own skips are for Windows only: nothing may be skipped here.
    for l in summary {
        assert!(!l.contains("--- SKIP"), "unexpected skip: {l}\n{stdout}");
    }
    let passed = |name: &str| run.passed(name);
    for t in SUITE {
        let name = format!("TestSnapshotterSuite/{t}");
        assert!(passed(&name), "{name} did not pass:\n{stdout}");
    }
    assert!(
        passed("TestRenameNonEmptyLower"),
        "TestRenameNonEmptyLower did not pass:\n{stdout}"
    );
}
