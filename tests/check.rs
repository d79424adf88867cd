//! `lazysnap check` and `df` through the CLI: a fresh store is consistent; each kind of damage
//! is found, named and (with `--repair`) fixed without touching intact data; an active
//! snapshot's changes are never removed; `df` adds up what is on disk.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::{lazysnap, ok};

fn check_json(root: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    let mut all = vec!["check", "--json"];
    all.extend_from_slice(args);
    let out = lazysnap(root, &all);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.success(), v["consistent"] == true, "{v:#}");
    (out.status.success(), v)
}

fn kinds(v: &serde_json::Value, field: &str) -> Vec<(String, String)> {
    let mut k: Vec<(String, String)> = v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    k.sort();
    k
}

/// The hex diffID of the image's top layer (its index file is `index/<hex>`).
fn top_diff_hex(root: &Path, image: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&ok(root, &["inspect", image])).unwrap();
    let diff = v["RootFS"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_str()
        .unwrap();
    diff.strip_prefix("sha256:").unwrap().to_string()
}

#[test]
fn finds_and_repairs_damage_without_touching_intact_data() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "edge-gzip", "edge");
    common::import_image(&root, "debian-zstd", "deb");
    let (clean, v) = check_json(&root, &["--verify-digests"]);
    assert!(clean, "{v:#}");
    assert!(v["checked"]["bytes_hashed"].as_u64().unwrap() > 1_000_000);
    assert!(v["checked"]["layers"].as_u64().unwrap() >= 4);

    // Damage: a corrupt index, a missing span map, stale temp files, a stray file, an orphan
    // snapshot directory, a layer blob with the right size and the wrong bytes.
    let diff_hex = top_diff_hex(&root, "edge");
    fs::write(root.join("index").join(&diff_hex), b"not an index").unwrap();
    let edge: serde_json::Value = serde_json::from_str(&ok(&root, &["inspect", "edge"])).unwrap();
    let edge_blob = edge["Chain"][0]["blob"].as_str().unwrap();
    let spans = [format!(
        "{}.spans",
        edge_blob.strip_prefix("sha256:").unwrap()
    )];
    fs::remove_file(root.join("index").join(&spans[0])).unwrap();
    fs::write(root.join("content/blobs/sha256/stray"), b"?").unwrap();
    fs::create_dir_all(root.join("snapshots/4242/upper")).unwrap();
    // A live temp file (held by this process, as a writer holds it) is not a problem.
    let live = tempfile::Builder::new()
        .prefix("write.")
        .tempfile_in(root.join("content/ingest"))
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(live.as_file());
    assert_eq!(unsafe { libc::flock(fd, libc::LOCK_EX) }, 0);
    let deb: serde_json::Value = serde_json::from_str(&ok(&root, &["inspect", "deb"])).unwrap();
    let deb_layer = deb["Chain"][0]["blob"].as_str().unwrap().to_string();
    let blob_path = root
        .join("content/blobs/sha256")
        .join(deb_layer.strip_prefix("sha256:").unwrap());
    let mut data = fs::read(&blob_path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::set_permissions(&blob_path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob_path, &data).unwrap();

    // Stale temp files (any other command's open of the root would remove them).
    fs::write(root.join("content/ingest/write.stale"), b"partial").unwrap();
    fs::write(root.join("index/.tmp-stale"), b"partial").unwrap();

    // Without --verify-digests the flipped byte goes unseen (same size); the rest is found.
    let (clean, v) = check_json(&root, &[]);
    assert!(!clean);
    let found = kinds(&v, "problems");
    let expect = [
        ("index_corrupt", format!("index/{diff_hex}")),
        ("spans_missing", format!("index/{}", spans[0])),
        ("stray_file", "content/blobs/sha256/stray".to_string()),
    ];
    for (k, s) in &expect {
        assert!(
            found.contains(&(k.to_string(), s.clone())),
            "{k} {s} not in {found:?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:?}");
    // What interrupted writes leave is garbage, listed apart from the problems.
    let left = kinds(&v, "leftovers");
    let expect_left = [
        ("orphan_snapshot_dir", "snapshots/4242".to_string()),
        ("temp_file", "content/ingest/write.stale".to_string()),
        ("temp_file", "index/.tmp-stale".to_string()),
    ];
    assert_eq!(
        left,
        expect_left
            .iter()
            .map(|(k, s)| (k.to_string(), s.clone()))
            .collect::<Vec<_>>()
    );
    let (_, v) = check_json(&root, &["--verify-digests"]);
    assert!(kinds(&v, "problems").contains(&("blob_corrupt".into(), deb_layer.clone())));

    // Repair: derived files rebuilt, leftovers removed, the corrupt blob removed and the
    // image that needs it with it; the other image is untouched and consistent.
    let (clean, v) = check_json(&root, &["--repair", "--verify-digests"]);
    assert!(clean, "{v:#}");
    assert!(live.path().exists(), "a live temp file was removed");
    assert!(root.join("index").join(&diff_hex).is_file());
    assert!(root.join("index").join(&spans[0]).is_file());
    assert!(!root.join("snapshots/4242").exists());
    assert!(!blob_path.exists());
    let images = ok(&root, &["images"]);
    assert!(
        images.contains("edge") && !images.contains("deb"),
        "{images}"
    );
    assert_eq!(v["leftovers"].as_array().unwrap().len(), 0, "{v:#}");
    let repaired = v["repaired"].as_array().unwrap();
    assert!(repaired.len() >= 7, "{v:#}");
    // Opening the root removes stale temp files, never a live one.
    fs::write(root.join("content/ingest/write.stale2"), b"partial").unwrap();
    ok(&root, &["images"]);
    assert!(!root.join("content/ingest/write.stale2").exists());
    assert!(live.path().exists());
    // Re-importing brings the removed image back.
    common::import_image(&root, "debian-zstd", "deb");
    let (clean, v) = check_json(&root, &["--verify-digests"]);
    assert!(clean, "{v:#}");
}

/// A `kill -9` of an import in the middle of its ingest leaves a temp file: `check` reports it
/// as a leftover with its size and what removes it, calls the store consistent and exits 0
/// (a monitoring script must not page anyone for a crash that lost nothing). `check --repair`
/// removes it; a real problem still exits 2.
#[test]
fn check_after_a_killed_import_reports_leftovers_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    ok(&root, &["images"]);
    // An uncompressed layer of real files big enough to be caught mid-ingest.
    let image = common::image("debian-none");
    let mut left = Vec::new();
    for attempt in 0..50u64 {
        let mut child = std::process::Command::new(common::lazysnap_bin())
            .arg("--root")
            .arg(&root)
            .args(["import", image.to_str().unwrap(), "--name", "killed"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until a temp file exists and has data, then kill -9.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let caught = loop {
            let temp = fs::read_dir(root.join("content/ingest"))
                .unwrap()
                .flatten()
                .any(|e| e.metadata().map(|m| m.len() > 4096).unwrap_or(false));
            if temp || std::time::Instant::now() > deadline {
                break temp;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200 + attempt * 50));
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        if caught {
            left = fs::read_dir(root.join("content/ingest"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            if !left.is_empty() {
                break;
            }
        }
        // Finished before the kill: start over on a clean store.
        fs::remove_dir_all(&root).unwrap();
        ok(&root, &["images"]);
    }
    assert!(!left.is_empty(), "no import was caught mid-ingest");
    let bytes: u64 = left.iter().map(|p| fs::metadata(p).unwrap().len()).sum();

    let out = lazysnap(&root, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check exited {:?}: {text}",
        out.status
    );
    assert!(
        text.contains("leftover: TempFile content/ingest/"),
        "{text}"
    );
    assert!(text.contains("check --repair"), "{text}");
    assert!(
        text.contains("consistent (") && !text.contains("NOT"),
        "{text}"
    );
    let (clean, v) = check_json(&root, &[]);
    assert!(clean, "{v:#}");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v:#}");
    let reported: u64 = v["leftovers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "temp_file")
        .map(|l| l["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(reported, bytes, "{v:#}");
    assert!(
        left.iter().all(|p| p.exists()),
        "check (not --repair) removed a file"
    );

    // --repair removes them and says so.
    let (clean, v) = check_json(&root, &["--repair"]);
    assert!(clean, "{v:#}");
    assert!(left.iter().all(|p| !p.exists()));
    assert_eq!(v["leftovers"].as_array().unwrap().len(), 0, "{v:#}");
    assert!(!v["repaired"].as_array().unwrap().is_empty(), "{v:#}");

    // A real inconsistency still exits 2, even beside leftovers.
    fs::write(root.join("content/ingest/write.stale"), b"partial").unwrap();
    common::import_image(&root, "edge-gzip", "edge");
    fs::write(root.join("content/ingest/write.stale"), b"partial").unwrap();
    let diff_hex = top_diff_hex(&root, "edge");
    fs::write(root.join("index").join(&diff_hex), b"not an index").unwrap();
    let out = lazysnap(&root, &["check"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_active_snapshot_is_never_removed_for_a_missing_blob() {
    if !common::can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "edge-none", "edge");
    let chain = serde_json::from_str::<serde_json::Value>(&ok(&root, &["inspect", "edge"]))
        .unwrap()["Snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&root, &["snapshot", "prepare", "work", &chain]);
    let mounts =
        serde_json::from_str::<serde_json::Value>(&ok(&root, &["snapshot", "mounts", "work"]))
            .unwrap();
    let mnt = common::SnapshotMount::new(&mounts, &tmp.path().join("work"));
    fs::write(mnt.dir.join("mine"), b"changes").unwrap();
    drop(mnt);
    // Remove every layer blob.
    let blobs = root.join("content/blobs/sha256");
    for e in fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        if e.metadata().unwrap().len() > 4096 {
            fs::remove_file(e.path()).unwrap();
        }
    }
    let (clean, v) = check_json(&root, &["--repair"]);
    assert!(
        !clean,
        "missing blobs under an active snapshot cannot be repaired"
    );
    assert!(
        kinds(&v, "problems")
            .iter()
            .any(|(k, _)| k == "blob_missing"),
        "{v:#}"
    );
    let list = ok(&root, &["snapshot", "ls"]);
    assert!(list.contains("work"), "{list}");
    ok(&root, &["snapshot", "rm", "work"]);
}

#[test]
fn df_adds_up_and_shows_what_gc_reclaims() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    common::import_image(&root, "edge-zstd", "a");
    common::import_image(&root, "debian-gzip", "b");
    let df: serde_json::Value = serde_json::from_str(&ok(&root, &["df", "--json"])).unwrap();
    let blob_bytes: u64 = fs::read_dir(root.join("content/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(df["blobs"]["bytes"].as_u64().unwrap(), blob_bytes);
    assert!(df["indexes"]["files"].as_u64().unwrap() >= 4);
    assert_eq!(df["reclaimable"]["blobs"], 0, "{df:#}");
    // Drop b's image row only (rmi would gc at once): its blobs become reclaimable.
    let conn = rusqlite::Connection::open(root.join("meta.db")).unwrap();
    conn.execute_batch("PRAGMA foreign_keys=ON").unwrap();
    assert_eq!(
        conn.execute("DELETE FROM images WHERE name = 'b'", [])
            .unwrap(),
        1
    );
    drop(conn);
    let df2: serde_json::Value = serde_json::from_str(&ok(&root, &["df", "--json"])).unwrap();
    let reclaim = df2["reclaimable"]["blob_bytes"].as_u64().unwrap();
    assert!(reclaim > 1_000_000, "{df2:#}");
    let gc: serde_json::Value = serde_json::from_str(&ok(&root, &["gc"])).unwrap();
    assert!(
        gc["bytes_freed"].as_u64().unwrap() >= reclaim,
        "{gc} vs {df2:#}"
    );
    let df3: serde_json::Value = serde_json::from_str(&ok(&root, &["df", "--json"])).unwrap();
    assert_eq!(df3["reclaimable"]["blob_bytes"], 0, "{df3:#}");
    let text = ok(&root, &["df"]);
    assert!(
        text.contains("reclaimable by gc") && text.contains("blobs"),
        "{text}"
    );
}

/// `gc` running over and over while imports are in flight in other processes never takes a
/// blob or index an import is about to record: every import succeeds and the store checks
/// consistent, digests included.
#[test]
fn gc_never_races_a_concurrent_import() {
    let data = common::testdata();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    ok(&root, &["images"]);
    let importers: Vec<_> = ["debian-gzip", "debian-zstd", "edge-gzip"]
        .iter()
        .map(|img| {
            std::process::Command::new(common::lazysnap_bin())
                .arg("--root")
                .arg(&root)
                .args(["import", data.join(img).to_str().unwrap(), "--name", img])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut gcs = 0;
    let mut importers: Vec<_> = importers.into_iter().map(Some).collect();
    let mut failures = Vec::new();
    // Let the imports get going (ingest, then indexing), then collect while they run.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut in_flight = 0;
    for c in importers.iter_mut().flatten() {
        if let Ok(None) = c.try_wait() {
            in_flight += 1;
        }
    }
    assert!(in_flight > 0, "the imports finished before gc could run");
    while importers.iter().any(Option::is_some) {
        ok(&root, &["gc"]);
        gcs += 1;
        for slot in importers.iter_mut() {
            if let Some(child) = slot {
                if let Ok(Some(_)) = child.try_wait() {
                    let out = slot.take().unwrap().wait_with_output().unwrap();
                    if !out.status.success() {
                        failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "imports failed under gc: {failures:?}");
    assert!(gcs >= 1);
    ok(&root, &["gc"]);
    let (consistent, v) = check_json(&root, &["--verify-digests"]);
    assert!(consistent, "{v:#}");
    let images = ok(&root, &["images"]);
    for img in ["debian-gzip", "debian-zstd", "edge-gzip"] {
        assert!(images.contains(img), "{images}");
    }
}
