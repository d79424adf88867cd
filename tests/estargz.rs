//! eStargz images made by the estargz Go library (scripts/make-estargz-images.py,
//! tools/estargz-convert) through a real FUSE mount: the tree equals umoci's unpack of the same
//! image, and equals the tree of the image it was converted from but for the two files
//! eStargz adds at the root (`.no.prefetch.landmark`, `stargz.index.json`).

mod common;

use common::{ok, CompareOptions, Mounted};

use std::path::{Path, PathBuf};

/// The files estargz.Build adds to every layer (no prioritized files: the "no prefetch" mark).
const ESTARGZ_FILES: &[&str] = &[".no.prefetch.landmark", "stargz.index.json"];

/// FUSE, umoci (the references) and the eStargz images (need Go and the estargz sources).
fn prerequisites(data: &Path) -> bool {
    common::can_mount()
        && common::require(common::have_cmd("umoci"), "umoci (scripts/install-deps.sh)")
        && common::require(
            data.join("debian-estargz").is_dir() && data.join("edge-estargz").is_dir(),
            "eStargz test images: go and golang-github-containerd-stargz-snapshotter-dev \
             (scripts/install-deps.sh)",
        )
}

fn assert_no_diffs(diffs: Vec<String>, what: &str) {
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first 50:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Mount `esgz` (imported from the layout of that name) and compare it with umoci's unpack of
/// the same layout (`ignore_mtime` added to the reference's implicit dirs) and with umoci's
/// unpack of `original`, the image it was converted from, without the eStargz files.
fn check(esgz: &str, original: &str, ignore_mtime: &[&str]) {
    let data = common::testdata();
    if !prerequisites(&data) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    ok(
        &root,
        &["import", data.join(esgz).to_str().unwrap(), "--name", esgz],
    );
    let mnt = tmp.path().join("mnt");
    let _m = Mounted::new(&root, esgz, &mnt);

    let reference = common::reference_tree(&data.join(esgz), common::TAG);
    let mut opts = CompareOptions::for_reference(&reference);
    opts.ignore_mtime
        .extend(ignore_mtime.iter().map(PathBuf::from));
    assert_no_diffs(
        common::compare_trees_with(&mnt, &reference, &opts),
        &format!("{esgz} vs umoci's unpack of it"),
    );
    for f in ESTARGZ_FILES {
        assert!(
            mnt.join(f).symlink_metadata().is_ok(),
            "{esgz}: no /{f} in the mount"
        );
    }

    let reference = common::reference_tree(&data.join(original), common::TAG);
    let mut opts = CompareOptions::for_reference(&reference);
    opts.ignore_paths
        .extend(ESTARGZ_FILES.iter().map(PathBuf::from));
    assert_no_diffs(
        common::compare_trees_with(&mnt, &reference, &opts),
        &format!("{esgz} vs umoci's unpack of {original}"),
    );
}

#[test]
fn debian_estargz_mount_equals_umoci_and_the_gzip_image() {
    check("debian-estargz", "debian-gzip", &[]);
}

/// umoci quirk, not a lazysnap one: estargz keeps only the last entry of a name, so in layer
/// 02-changes `dup/d/child` comes before the (second, kept) `dup/d` entry; umoci creates
/// `dup/d` with MkdirAll for the child and does not put back the mtime of `dup` it thereby
/// changes, so its `dup` shows the unpack time. The tree of edge-gzip (second comparison) has
/// the declared mtime, as the mount does.
#[test]
fn edge_estargz_mount_equals_umoci_and_the_gzip_image() {
    check("edge-estargz", "edge-gzip", &["dup"]);
}
