//! Crash safety: the CLI is killed with SIGKILL at a random moment of `import`, `snapshot
//! prepare` / `commit` / `rm`, `gc` (through `rmi`) and `commit DIR NAME` of a written `mount
//! --rw` directory. After every kill the store must check consistent — the only findings
//! allowed are what a kill leaves by design (temp files, an orphan snapshot directory), and
//! `check --repair` must clear them — and everything that existed before the kill must still
//! be there with its content: blob digests verified, images mounted and their trees hashed.
//!
//! `LAZYSNAP_CRASH_ITERATIONS` (default 12) sets the number of kills, `LAZYSNAP_CRASH_SEED`
//! the base seed (default: from the clock; printed). Every iteration prints its seed, the
//! operation and the delay before the kill, so a failure names what to replay.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};

use common::{can_mount, json, lazysnap, lazysnap_bin, ok};

/// Removes every active snapshot and view (unmounting them) and the rw mounts, even when the
/// test fails, so no daemon outlives it.
struct Cleanup {
    root: PathBuf,
    rw_dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.rw_dirs {
            let _ = lazysnap(&self.root, &["umount", d.to_str().unwrap_or("")]);
        }
        for _ in 0..10 {
            let out = lazysnap(
                &self.root,
                &["snapshot", "ls", "--json", "--filter", "kind!=committed"],
            );
            let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                break;
            };
            let Some(list) = list.as_array() else { break };
            if list.is_empty() {
                break;
            }
            for s in list {
                let _ = lazysnap(
                    &self.root,
                    &["snapshot", "rm", s["name"].as_str().unwrap_or("")],
                );
            }
        }
        // Orphan directories a kill left may still carry a daemon's mount.
        let _ = lazysnap(&self.root, &["check", "--repair"]);
    }
}

/// A hash of a mounted tree: every path, its kind, file contents and link targets (not
/// times or owners: a committed tree is compared with the rw view it came from).
fn tree_hash(dir: &Path) -> String {
    let mut h = Sha256::new();
    let mut stack = vec![PathBuf::new()];
    let mut entries = BTreeMap::new();
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .unwrap_or_else(|e| panic!("reading {}: {e}", abs.display()))
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = dir.join(&r);
            let md = fs::symlink_metadata(&p).unwrap();
            let what = if md.is_dir() {
                stack.push(r.clone());
                "d".to_string()
            } else if md.file_type().is_symlink() {
                format!("l {}", fs::read_link(&p).unwrap().display())
            } else if md.is_file() {
                let data = fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
                format!("f {}", hex::encode(Sha256::digest(&data)))
            } else {
                format!("o {:o}", md.mode() & 0o170000)
            };
            entries.insert(r, what);
        }
    }
    for (p, w) in entries {
        h.update(p.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        h.update(w.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Mounts `image` read-only and hashes its tree.
fn image_tree(root: &Path, image: &str, mnt: &Path) -> String {
    fs::create_dir_all(mnt).unwrap();
    ok(root, &["mount", image, mnt.to_str().unwrap()]);
    let h = std::panic::catch_unwind(|| tree_hash(mnt));
    let diagnostics = || {
        let log = fs::read_to_string(root.join("logs/mount.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let here: Vec<&str> = mounts
            .lines()
            .filter(|l| l.contains(mnt.to_str().unwrap()))
            .collect();
        format!(
            "mountinfo at {}: {here:?}\nlast lines of mount.log (newest first):\n{}",
            mnt.display(),
            tail.join("\n")
        )
    };
    if h.is_err() {
        let d = diagnostics();
        let _ = lazysnap(root, &["umount", mnt.to_str().unwrap()]);
        panic!("hashing the tree of {image} failed\n{d}");
    }
    ok(root, &["umount", mnt.to_str().unwrap()]);
    h.unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Import,
    Prepare,
    Commit,
    Remove,
    Gc,
    CommitRw,
}

const OPS: [Op; 6] = [
    Op::Import,
    Op::Prepare,
    Op::Commit,
    Op::Remove,
    Op::Gc,
    Op::CommitRw,
];

impl Op {
    /// A first guess of the operation's length in a debug build (ms); the loop then learns
    /// it from the runs that complete, so kills land anywhere from the start to the end.
    fn first_estimate_ms(self) -> f64 {
        match self {
            Op::Import => 400.0,
            Op::Prepare => 80.0,
            Op::Commit => 150.0,
            Op::Remove => 40.0,
            Op::Gc => 40.0,
            Op::CommitRw => 150.0,
        }
    }
}

/// What exists and must survive: image names and snapshot keys.
#[derive(Debug, Default, Clone)]
struct State {
    images: BTreeSet<String>,
    snapshots: BTreeMap<String, String>, // key -> kind
}

fn state(root: &Path) -> State {
    let images = json(root, &["images", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["Name"].as_str().unwrap().to_string())
        .collect();
    let snapshots = json(root, &["snapshot", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    State { images, snapshots }
}

#[derive(Debug, Default)]
struct Figures {
    iterations: u64,
    killed: u64,
    completed: u64,
    temp_files_left: u64,
    temp_bytes_left: u64,
    orphan_dirs_left: u64,
    unused_lowers_left: u64,
    inconsistencies: Vec<String>,
    lost: Vec<String>,
}

/// Runs `lazysnap check` (as is, before anything else opens the root) and, when it finds
/// something, `check --repair`. Returns the findings that are not a kill's expected leftovers.
fn check_after(root: &Path, figures: &mut Figures, verify: bool) -> Vec<String> {
    let mut args = vec!["check", "--json"];
    if verify {
        args.push("--verify-digests");
    }
    let out = lazysnap(root, &args);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // A kill leaves leftovers, never problems: the store is consistent and check exits 0.
    let unexpected: Vec<String> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    let leftovers = report["leftovers"].as_array().unwrap();
    for l in leftovers {
        match l["kind"].as_str().unwrap() {
            "temp_file" => {
                figures.temp_files_left += 1;
                figures.temp_bytes_left += l["bytes"].as_u64().unwrap();
            }
            "orphan_snapshot_dir" => figures.orphan_dirs_left += 1,
            // A kill between a snapshot's removal and its shared lower's unmount.
            "unused_lower" => figures.unused_lowers_left += 1,
            k => panic!("unknown leftover kind {k}"),
        }
    }
    assert_eq!(
        out.status.success(),
        report["consistent"].as_bool().unwrap(),
        "check's exit status must say whether the store is consistent"
    );
    if !out.status.success() || !leftovers.is_empty() {
        args.push("--repair");
        let out = lazysnap(root, &args);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            out.status.success()
                && report["consistent"] == true
                && report["leftovers"].as_array().unwrap().is_empty(),
            "check --repair left problems: {report:#}"
        );
    }
    unexpected
}

#[test]
fn kill_at_random_points_then_check_and_compare() {
    if !can_mount() {
        return;
    }
    let started = Instant::now();
    let iterations = common::env_number("LAZYSNAP_CRASH_ITERATIONS", 12);
    let base_seed: u64 = std::env::var("LAZYSNAP_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash: {iterations} iterations, LAZYSNAP_CRASH_SEED={base_seed}");
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mnt = tmp.path().join("mnt");
    let mut cleanup = Cleanup {
        root: root.clone(),
        rw_dirs: Vec::new(),
    };

    // Sources, and the tree each one mounts as when imported without interruption.
    let sources = [
        "edge-zstd",
        "edge-gzip",
        "edge-mixed",
        "edge.oci.tar",
        "debian-zstd",
        "debian-gzip.oci.tar",
    ];
    ok(
        &root,
        &[
            "import",
            data.join("edge-none").to_str().unwrap(),
            "--name",
            "base",
        ],
    );
    let mut expected_tree: BTreeMap<String, String> = BTreeMap::new();
    expected_tree.insert("base".into(), image_tree(&root, "base", &mnt));
    let mut source_tree: BTreeMap<&str, String> = BTreeMap::new();
    {
        let ref_root = tmp.path().join("ref");
        for s in sources {
            ok(
                &ref_root,
                &["import", data.join(s).to_str().unwrap(), "--name", "x"],
            );
            source_tree.insert(s, image_tree(&ref_root, "x", &mnt));
            ok(&ref_root, &["rmi", "x"]);
        }
    }
    let base_chain = json(&root, &["inspect", "base"])["Snapshot"]
        .as_str()
        .unwrap()
        .to_string();

    let mut figures = Figures::default();
    let mut estimate: BTreeMap<String, f64> = OPS
        .iter()
        .map(|o| (format!("{o:?}"), o.first_estimate_ms()))
        .collect();
    let mut before = state(&root);
    for i in 0..iterations {
        let seed = base_seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let op = OPS[rng.random_range(0..OPS.len())];
        let est = estimate[&format!("{op:?}")];
        let delay = rng.random_range(0..=(est * 1.3) as u64);
        let ctx = format!("iteration {i} (seed {seed}, {op:?}, kill after {delay} ms)");
        // Set up what the operation needs (not killed), and the command to kill.
        let name = format!("n{i}");
        let mut expect_tree: Option<(String, String)> = None;
        let args: Vec<String> = match op {
            Op::Import => {
                let s = sources[rng.random_range(0..sources.len())];
                expect_tree = Some((name.clone(), source_tree[s].clone()));
                vec![
                    "import".into(),
                    data.join(s).display().to_string(),
                    "--name".into(),
                    name.clone(),
                ]
            }
            Op::Prepare => vec![
                "snapshot".into(),
                "prepare".into(),
                name.clone(),
                base_chain.clone(),
            ],
            Op::Commit | Op::Remove => {
                let actives: Vec<&String> = before
                    .snapshots
                    .iter()
                    .filter(|(k, kind)| *kind == "active" && !k.starts_with("rw:"))
                    .map(|(k, _)| k)
                    .collect();
                let key = if actives.is_empty() {
                    ok(
                        &root,
                        &["snapshot", "prepare", &format!("p{i}"), &base_chain],
                    );
                    format!("p{i}")
                } else {
                    actives[rng.random_range(0..actives.len())].clone()
                };
                if op == Op::Commit {
                    // Something to commit: a file of random size in the upper.
                    let m = json(&root, &["snapshot", "mounts", &key]);
                    let mnt = common::SnapshotMount::new(&m, &tmp.path().join("work"));
                    let size = rng.random_range(0..3_000_000usize);
                    fs::write(mnt.dir.join(format!("file-{i}")), vec![i as u8; size]).unwrap();
                    drop(mnt);
                    vec!["snapshot".into(), "commit".into(), name.clone(), key]
                } else {
                    vec!["snapshot".into(), "rm".into(), key]
                }
            }
            Op::Gc => {
                // Give gc something: an image to drop (not killed).
                if let Some(img) = before.images.iter().find(|n| *n != "base").cloned() {
                    ok(&root, &["rmi", &img]);
                    expected_tree.remove(&img);
                }
                vec!["gc".into()]
            }
            Op::CommitRw => {
                let dir = tmp.path().join(format!("rw{i}"));
                fs::create_dir_all(&dir).unwrap();
                ok(&root, &["mount", "base", dir.to_str().unwrap(), "--rw"]);
                cleanup.rw_dirs.push(dir.clone());
                let size = rng.random_range(0..4_000_000usize);
                fs::write(dir.join(format!("written-{i}")), vec![7u8; size]).unwrap();
                let _ = fs::remove_file(dir.join("etc/hostname"));
                expect_tree = Some((name.clone(), tree_hash(&dir)));
                vec!["commit".into(), dir.display().to_string(), name.clone()]
            }
        };
        before = state(&root);
        // Run it and kill it.
        let mut child = Command::new(lazysnap_bin())
            .arg("--root")
            .arg(&root)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let spawned = Instant::now();
        let deadline = spawned + Duration::from_millis(delay);
        let mut finished = None;
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait().unwrap() {
                finished = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let status = match finished {
            Some(s) => {
                // It ran to the end: learn how long that takes.
                let took = spawned.elapsed().as_secs_f64() * 1000.0;
                let e = estimate.get_mut(&format!("{op:?}")).unwrap();
                *e = 0.5 * *e + 0.5 * took;
                s
            }
            None => {
                let _ = child.kill();
                // Killed before the end: the operation may take longer than estimated, so
                // reach further next time (completions pull the estimate back).
                *estimate.get_mut(&format!("{op:?}")).unwrap() *= 1.1;
                child.wait().unwrap()
            }
        };
        let completed = status.success();
        if finished.is_some() {
            assert!(completed, "{ctx}: {args:?} failed without being killed");
            figures.completed += 1;
        } else {
            figures.killed += 1;
        }
        figures.iterations += 1;
        // Reopen: check first (verifying digests every few iterations and at the end).
        let verify = i % 4 == 3 || i + 1 == iterations;
        let left = |f: &Figures| f.temp_files_left + f.orphan_dirs_left + f.unused_lowers_left;
        let left_before = left(&figures);
        for u in check_after(&root, &mut figures, verify) {
            figures.inconsistencies.push(format!("{ctx}: {u}"));
        }
        // Leftovers are a kill's: an operation that ran to its end leaves none.
        if completed && left(&figures) != left_before {
            figures
                .inconsistencies
                .push(format!("{ctx}: completed, yet check found leftovers"));
        }
        // Everything that existed before is still there (but what the operation removes).
        let after = state(&root);
        for img in &before.images {
            if !after.images.contains(img) {
                figures.lost.push(format!("{ctx}: image {img} is gone"));
            }
        }
        for (key, kind) in &before.snapshots {
            let removed_by_op = matches!(op, Op::Remove | Op::Gc) || key.starts_with("commit:");
            if !after.snapshots.contains_key(key) && !removed_by_op {
                figures
                    .lost
                    .push(format!("{ctx}: {kind} snapshot {key} is gone"));
            }
        }
        if completed {
            match op {
                Op::Import | Op::CommitRw => assert!(
                    after.images.contains(&name),
                    "{ctx}: completed, but image {name} is not listed"
                ),
                Op::Prepare | Op::Commit => assert!(
                    after.snapshots.contains_key(&name),
                    "{ctx}: completed, but snapshot {name} is not listed"
                ),
                _ => {}
            }
        }
        if op == Op::CommitRw && !completed {
            // A retry of the interrupted commit works.
            ok(&root, &["commit", &args[1], &name]);
        }
        if let Some((n, hash)) = expect_tree {
            if after.images.contains(&n) || op == Op::CommitRw {
                expected_tree.insert(n, hash);
            }
        }
        if op == Op::CommitRw {
            // The rw snapshot goes (unmounts its daemon); the committed image stays.
            ok(&root, &["snapshot", "rm", &format!("rw:{}", args[1])]);
        }
        // Every image's tree is intact (mounted and hashed) every few iterations.
        if i % 4 == 3 || i + 1 == iterations {
            let now = state(&root);
            for (img, want) in &expected_tree {
                if now.images.contains(img) {
                    let got = image_tree(&root, img, &mnt);
                    if &got != want {
                        figures
                            .lost
                            .push(format!("{ctx}: the tree of image {img} changed"));
                    }
                }
            }
        }
        before = state(&root);
        eprintln!("{ctx}: {}", if completed { "completed" } else { "killed" });
    }
    // The store still works: gc, and a last check with digests.
    ok(&root, &["gc"]);
    let last = json(&root, &["check", "--json", "--verify-digests"]);
    assert_eq!(last["consistent"], true, "{last:#}");
    let df = json(&root, &["df", "--json"]);
    assert_eq!(
        df["reclaimable"]["blobs"], 0,
        "gc leaves nothing reclaimable: {df:#}"
    );
    drop(cleanup);
    eprintln!(
        "crash figures: iterations {}, killed {}, completed {}, temp files left by kills {} ({} bytes, removed by check --repair), orphan snapshot dirs {}, unused lowers {}, inconsistencies {}, items lost {}, {:.1}s",
        figures.iterations,
        figures.killed,
        figures.completed,
        figures.temp_files_left,
        figures.temp_bytes_left,
        figures.orphan_dirs_left,
        figures.unused_lowers_left,
        figures.inconsistencies.len(),
        figures.lost.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        figures.inconsistencies.is_empty() && figures.lost.is_empty(),
        "inconsistencies:\n{}\nlost:\n{}",
        figures.inconsistencies.join("\n"),
        figures.lost.join("\n")
    );
}
