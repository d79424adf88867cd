//! `lazysnap check`: is the store consistent? The database (SQLite's integrity and foreign-key
//! checks), every blob a row names (present, right size, with `verify_digests` right sha256),
//! every index, span map and local copy a row names (present, parses, validates), and no
//! active snapshot without its directory. Those are *problems*: the store is not consistent
//! and `check` exits 2.
//!
//! What an interrupted write leaves — temp files no live process holds, a snapshot directory
//! without its row — is garbage, not damage (as containerd treats stale ingests): such
//! *leftovers* are reported with their size and what removes them, and the store is still
//! consistent. Unreferenced blobs and index files are not problems either: they are reported
//! as reclaimable (what `gc` removes).
//!
//! [`repair`] fixes what can be fixed without losing intact data, then checks again: stale
//! temp files and orphan snapshot directories are removed; a derived file (index, span map,
//! local copy) that is missing or corrupt is rebuilt from its blob; a blob file that is corrupt
//! is removed (it is not the blob its name says), and what needs a missing blob — the images
//! naming it, the committed snapshots made of it — is removed, as a re-import brings it back.
//! Nothing is removed from under an active snapshot: its changes exist nowhere else.
//!
//! Knows the root's layout and the metadata's shape; nothing of FUSE beyond unmounting a
//! stale mount, nothing of tar.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tracing::{info_span, warn};

use crate::digest::Digest;
use crate::meta::MetaError;
use crate::root::Root;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, CheckError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CheckError {
    let context = context.into();
    move |source| CheckError::Io { context, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// `PRAGMA integrity_check` found damage.
    Database,
    /// A row references a row that does not exist.
    ForeignKey,
    BlobMissing,
    /// Wrong size or (verified) wrong sha256.
    BlobCorrupt,
    /// A file in the blob directory whose name is not a digest.
    StrayFile,
    IndexMissing,
    IndexCorrupt,
    SpansMissing,
    SpansCorrupt,
    LocalCopyMissing,
    /// An active snapshot or view whose directory is gone.
    SnapshotDirMissing,
}

/// What an interrupted write leaves behind: garbage that loses nothing when removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftoverKind {
    /// A temp file no live process holds (left by a killed one).
    TempFile,
    /// A directory under `snapshots/` no snapshot row owns.
    OrphanSnapshotDir,
    /// A shared lower (under `lowers/`, mounted or not) no overlay-mode snapshot uses.
    UnusedLower,
}

impl LeftoverKind {
    /// The commands that remove this kind of leftover.
    pub fn removed_by(self) -> &'static str {
        match self {
            LeftoverKind::TempFile => {
                "removed by `lazysnap gc`, `check --repair` or the next lazysnap command that opens the store"
            }
            LeftoverKind::OrphanSnapshotDir | LeftoverKind::UnusedLower => {
                "removed by `lazysnap check --repair`, `snapshot cleanup` or containerd's cleanup"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    pub kind: LeftoverKind,
    /// A path relative to the root.
    pub subject: String,
    pub bytes: u64,
    pub detail: String,
    pub removed_by: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// What is wrong: a digest, a path (relative to the root), a snapshot key, a table.
    pub subject: String,
    pub detail: String,
}

/// What `gc` would remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reclaimable {
    pub blobs: usize,
    pub blob_bytes: u64,
    pub index_files: usize,
    pub index_bytes: u64,
}

impl Reclaimable {
    pub fn bytes(&self) -> u64 {
        self.blob_bytes + self.index_bytes
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Checked {
    pub blobs: usize,
    pub layers: usize,
    pub snapshots: usize,
    /// Bytes hashed to verify digests (0 without `verify_digests`).
    pub bytes_hashed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// No problems; leftovers and reclaimable files do not count.
    pub consistent: bool,
    pub digests_verified: bool,
    pub problems: Vec<Problem>,
    /// Garbage of interrupted writes (see [`Leftover`]); with `--repair`, what is left after it.
    pub leftovers: Vec<Leftover>,
    /// With `--repair`: the problems and leftovers found first and what was done about them;
    /// `problems` and `leftovers` are then what the check after the repair found.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub found: Vec<Problem>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub found_leftovers: Vec<Leftover>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
    pub reclaimable: Reclaimable,
    pub checked: Checked,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Hash every blob (reads the whole store); without it sizes are compared.
    pub verify_digests: bool,
}

/// Checks the store; changes nothing.
pub fn check(root: &mut Root, opts: &Options) -> Result<Report> {
    let _span = info_span!("check", root = %root.path.display()).entered();
    let mut problems = Vec::new();
    let mut leftovers = Vec::new();
    let mut checked = Checked::default();
    check_database(root, &mut problems)?;
    check_blobs(root, opts, &mut problems, &mut checked)?;
    check_derived(root, &mut problems, &mut checked)?;
    check_temp_files(root, &mut leftovers)?;
    check_snapshots(root, &mut problems, &mut leftovers, &mut checked)?;
    let reclaimable = reclaimable(root)?;
    problems.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    leftovers.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    Ok(Report {
        consistent: problems.is_empty(),
        digests_verified: opts.verify_digests,
        problems,
        leftovers,
        found: Vec::new(),
        found_leftovers: Vec::new(),
        repaired: Vec::new(),
        reclaimable,
        checked,
    })
}

/// Checks, fixes what can be fixed safely (see the module docs), and checks again.
pub fn repair(root: &mut Root, opts: &Options) -> Result<Report> {
    let _span = info_span!("repair", root = %root.path.display()).entered();
    let first = check(root, opts)?;
    let mut done = Vec::new();
    // Order matters: corrupt blobs become missing ones; rebuilding a derived file needs an
    // intact blob; removing what needs a missing blob comes last.
    let mut missing: Vec<String> = Vec::new();
    for l in &first.leftovers {
        if l.kind != LeftoverKind::TempFile {
            continue; // orphan directories go below, under the write lock
        }
        let path = root.path.join(&l.subject);
        match crate::store::remove_if_stale(&path) {
            Ok(Some(_)) => done.push(format!("removed {} ({} bytes)", l.subject, l.bytes)),
            Ok(None) => {}
            Err(e) => warn!(path = %path.display(), error = %e, "could not remove"),
        }
    }
    for p in &first.problems {
        match p.kind {
            ProblemKind::StrayFile => {
                let path = root.path.join(&p.subject);
                match std::fs::remove_file(&path) {
                    Ok(()) => done.push(format!("removed {}", p.subject)),
                    Err(e) => warn!(path = %path.display(), error = %e, "could not remove"),
                }
            }
            ProblemKind::BlobCorrupt => {
                let Ok(d) = Digest::parse(&p.subject) else {
                    continue;
                };
                match root.store.remove(&d) {
                    Ok(()) => {
                        done.push(format!("removed corrupt blob {} ({})", p.subject, p.detail));
                        missing.push(p.subject.clone());
                    }
                    Err(e) => warn!(blob = %p.subject, error = %e, "could not remove"),
                }
            }
            ProblemKind::BlobMissing => missing.push(p.subject.clone()),
            _ => {}
        }
    }
    done.extend(remove_orphan_snapshot_dirs(root)?);
    done.extend(remove_unused_lowers(root));
    for p in &first.problems {
        if p.kind == ProblemKind::SnapshotDirMissing {
            match root.meta.remove_snapshot(&p.subject) {
                Ok(_) => done.push(format!(
                    "removed snapshot {} (its directory is gone)",
                    p.subject
                )),
                Err(e) => warn!(key = %p.subject, error = %e, "could not remove"),
            }
        }
    }
    let derived: Vec<&Problem> = first
        .problems
        .iter()
        .filter(|p| {
            matches!(
                p.kind,
                ProblemKind::IndexMissing
                    | ProblemKind::IndexCorrupt
                    | ProblemKind::SpansMissing
                    | ProblemKind::SpansCorrupt
                    | ProblemKind::LocalCopyMissing
            )
        })
        .collect();
    if !derived.is_empty() {
        let (rebuilt, lost) = rebuild_derived(root, &derived, &missing)?;
        done.extend(rebuilt);
        missing.extend(lost);
    }
    missing.sort();
    missing.dedup();
    for digest in &missing {
        match root.meta.drop_blob_dependents(digest) {
            Ok((images, snapshots)) => done.push(format!(
                "blob {digest} is missing: removed images [{}] and snapshots [{}] that need it",
                images.join(", "),
                snapshots.join(", ")
            )),
            Err(e) => warn!(blob = %digest, error = %e, "left as is"),
        }
    }
    let mut report = check(root, opts)?;
    report.found = first.problems;
    report.found_leftovers = first.leftovers;
    report.repaired = done;
    Ok(report)
}

fn check_database(root: &Root, problems: &mut Vec<Problem>) -> Result<()> {
    for msg in root.meta.integrity_problems()? {
        problems.push(Problem {
            kind: ProblemKind::Database,
            subject: "meta.db".into(),
            detail: msg,
        });
    }
    for (table, rowid, parent) in root.meta.foreign_key_problems()? {
        problems.push(Problem {
            kind: ProblemKind::ForeignKey,
            subject: table.clone(),
            detail: format!(
                "row {} of {table} references a missing row of {parent}",
                rowid.map_or("?".into(), |r| r.to_string())
            ),
        });
    }
    Ok(())
}

/// Every blob some row names: present, the size recorded, with `verify_digests` the digest.
fn check_blobs(
    root: &Root,
    opts: &Options,
    problems: &mut Vec<Problem>,
    checked: &mut Checked,
) -> Result<()> {
    // digest -> (expected size if known, who needs it)
    let mut wanted: BTreeMap<String, (Option<u64>, Vec<String>)> = BTreeMap::new();
    // Lazily pulled blobs: digest -> their remote record (the blob may never be local).
    let mut remote: BTreeMap<String, String> = BTreeMap::new();
    for b in root.meta.blobs()? {
        if let Some(r) = &b.remote {
            remote.insert(b.digest.clone(), r.clone());
        }
        let e = wanted.entry(b.digest.clone()).or_default();
        e.0 = Some(b.size);
        e.1.push(format!("layer {}", b.diff_id));
    }
    for (digest, size, image) in root.meta.image_blob_refs()? {
        let e = wanted.entry(digest).or_default();
        if e.0.is_none() {
            e.0 = size;
        }
        e.1.push(format!("image {image}"));
    }
    for (digest, (size, users)) in &wanted {
        checked.blobs += 1;
        let Ok(d) = Digest::parse(digest) else {
            problems.push(Problem {
                kind: ProblemKind::BlobCorrupt,
                subject: digest.clone(),
                detail: format!("not a valid digest (named by {})", users.join(", ")),
            });
            continue;
        };
        let path = root.store.blob_path(&d);
        let md = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let detail = match remote.get(digest) {
                    Some(rel) => match crate::registry::lazy::RemoteInfo::load(&root.abs(rel), &d) {
                        // Still in the registry, as recorded: nothing missing.
                        Ok(_) => continue,
                        Err(e) => format!(
                            "lazily pulled, but its remote record is unusable ({e:#}); needed by {}",
                            users.join(", ")
                        ),
                    },
                    None => format!("needed by {}", users.join(", ")),
                };
                problems.push(Problem {
                    kind: ProblemKind::BlobMissing,
                    subject: digest.clone(),
                    detail,
                });
                continue;
            }
            Err(e) => return Err(io_err(format!("stat {}", path.display()))(e)),
        };
        if let Some(size) = size.filter(|&s| s != md.len()) {
            problems.push(Problem {
                kind: ProblemKind::BlobCorrupt,
                subject: digest.clone(),
                detail: format!("{} bytes, recorded as {size}", md.len()),
            });
            continue;
        }
        if opts.verify_digests {
            let actual = sha256_file(&path)?;
            checked.bytes_hashed += md.len();
            if actual != d {
                problems.push(Problem {
                    kind: ProblemKind::BlobCorrupt,
                    subject: digest.clone(),
                    detail: format!("content hashes to {actual}"),
                });
            }
        }
    }
    for e in std::fs::read_dir(root.store.blobs_dir()).map_err(io_err("listing blobs"))? {
        let e = e.map_err(io_err("listing blobs"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if Digest::parse(&format!("sha256:{name}")).is_err() {
            problems.push(Problem {
                kind: ProblemKind::StrayFile,
                subject: rel(root, &e.path()),
                detail: "not named by a digest: never read, never collected".into(),
            });
        }
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<Digest> {
    let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        h.update(&buf[..n]);
    }
    Ok(Digest::sha256_from_bytes(h.finalize().into()))
}

/// Index files, span maps and local copies the rows name: present and loadable.
fn check_derived(root: &Root, problems: &mut Vec<Problem>, checked: &mut Checked) -> Result<()> {
    for l in root.meta.layers()? {
        checked.layers += 1;
        let path = root.abs(&l.index_path);
        if !path.is_file() {
            problems.push(Problem {
                kind: ProblemKind::IndexMissing,
                subject: l.index_path.clone(),
                detail: format!("index of layer {}", l.diff_id),
            });
            continue;
        }
        match crate::index::LayerIndex::load(&path) {
            Ok(ix) if ix.stats.diff_id == l.diff_id => {}
            Ok(ix) => problems.push(Problem {
                kind: ProblemKind::IndexCorrupt,
                subject: l.index_path.clone(),
                detail: format!(
                    "index of layer {} describes layer {}",
                    l.diff_id, ix.stats.diff_id
                ),
            }),
            Err(e) => problems.push(Problem {
                kind: ProblemKind::IndexCorrupt,
                subject: l.index_path.clone(),
                detail: e.to_string(),
            }),
        }
    }
    for b in root.meta.blobs()? {
        let path = root.abs(&b.spans_path);
        let map = match std::fs::read(&path) {
            Ok(data) => match postcard::from_bytes::<crate::blob::SpanMap>(&data) {
                Ok(map) => match map.validate(&b.digest) {
                    Ok(()) if map.compressed_size == b.size => Some(map),
                    Ok(()) => {
                        problems.push(Problem {
                            kind: ProblemKind::SpansCorrupt,
                            subject: b.spans_path.clone(),
                            detail: format!(
                                "made from {} bytes, the blob has {}",
                                map.compressed_size, b.size
                            ),
                        });
                        None
                    }
                    Err(e) => {
                        problems.push(Problem {
                            kind: ProblemKind::SpansCorrupt,
                            subject: b.spans_path.clone(),
                            detail: e.to_string(),
                        });
                        None
                    }
                },
                Err(e) => {
                    problems.push(Problem {
                        kind: ProblemKind::SpansCorrupt,
                        subject: b.spans_path.clone(),
                        detail: format!("does not decode: {e}"),
                    });
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                problems.push(Problem {
                    kind: ProblemKind::SpansMissing,
                    subject: b.spans_path.clone(),
                    detail: format!("span map of blob {}", b.digest),
                });
                None
            }
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let needs_copy = map.as_ref().is_some_and(|m| m.has_local_copy());
        if let Some(copy) = b.local_copy.as_deref().filter(|_| needs_copy) {
            if !root.abs(copy).is_file() {
                problems.push(Problem {
                    kind: ProblemKind::LocalCopyMissing,
                    subject: copy.to_string(),
                    detail: format!("local seekable copy of blob {}", b.digest),
                });
            }
        } else if needs_copy {
            problems.push(Problem {
                kind: ProblemKind::LocalCopyMissing,
                subject: b.spans_path.clone(),
                detail: format!(
                    "blob {} needs a local copy the metadata does not name",
                    b.digest
                ),
            });
        }
    }
    Ok(())
}

fn check_temp_files(root: &Root, leftovers: &mut Vec<Leftover>) -> Result<()> {
    for p in root.temp_files().map_err(io_err("listing temp files"))? {
        match crate::store::is_stale_temp(&p) {
            Ok(true) => {
                let bytes = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                leftovers.push(Leftover {
                    kind: LeftoverKind::TempFile,
                    subject: rel(root, &p),
                    bytes,
                    detail: "left by an interrupted write".into(),
                    removed_by: LeftoverKind::TempFile.removed_by(),
                });
            }
            Ok(false) => {} // being written right now
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("checking {}", p.display()))(e)),
        }
    }
    Ok(())
}

/// Directories under `snapshots/` and the rows that own them, compared under the write lock
/// (a prepare in another process makes its directory inside its transaction).
fn check_snapshots(
    root: &mut Root,
    problems: &mut Vec<Problem>,
    leftovers: &mut Vec<Leftover>,
    checked: &mut Checked,
) -> Result<()> {
    let dir = root.path.join("snapshots");
    let (rows, entries) = root.meta.with_write_lock(|_| {
        let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries
    })?;
    let ids: HashSet<String> = rows.iter().map(|r| r.id.to_string()).collect();
    for e in entries {
        let name = e
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !ids.contains(&name) {
            leftovers.push(Leftover {
                kind: LeftoverKind::OrphanSnapshotDir,
                subject: rel(root, &e),
                bytes: tree_bytes(&e),
                detail: "no snapshot owns it (left by an interrupted prepare or remove)".into(),
                removed_by: LeftoverKind::OrphanSnapshotDir.removed_by(),
            });
        }
    }
    for (_, e) in crate::snapshot::unused_lowers(root, &rows) {
        let mounted = lazysnap_fuse::is_mountpoint(&e);
        leftovers.push(Leftover {
            kind: LeftoverKind::UnusedLower,
            subject: rel(root, &e),
            bytes: 0,
            detail: format!(
                "shared lower no snapshot uses ({})",
                if mounted {
                    "still mounted"
                } else {
                    "not mounted"
                }
            ),
            removed_by: LeftoverKind::UnusedLower.removed_by(),
        });
    }
    for r in &rows {
        checked.snapshots += 1;
        if r.kind != "committed" && !dir.join(r.id.to_string()).join("upper").is_dir() {
            problems.push(Problem {
                kind: ProblemKind::SnapshotDirMissing,
                subject: r.key.clone(),
                detail: format!(
                    "{} snapshot without {}",
                    r.kind,
                    rel(root, &dir.join(r.id.to_string()).join("upper"))
                ),
            });
        }
    }
    Ok(())
}

/// Bytes of the regular files under `dir` (symlinks not followed; a mount point's contents
/// count only if something still serves it, which a dead daemon's does not).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let dev = md.dev();
    rd.flatten()
        .map(|e| {
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() && m.dev() == dev => tree_bytes(&p),
                Ok(m) if m.is_file() => m.len(),
                _ => 0,
            }
        })
        .sum()
}

/// Removes snapshot directories no row owns, under the write lock.
fn remove_orphan_snapshot_dirs(root: &mut Root) -> Result<Vec<String>> {
    let dir = root.path.join("snapshots");
    let root_path = root.path.clone();
    let (_, done) = root.meta.with_write_lock(|rows| {
        let ids: HashSet<i64> = rows.iter().map(|r| r.id).collect();
        let mut done = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return done;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<i64>().is_ok_and(|id| ids.contains(&id)) {
                continue;
            }
            let path = e.path();
            match remove_orphan_dir(&path) {
                Ok(()) => done.push(format!(
                    "removed orphan snapshot directory {}",
                    path.strip_prefix(&root_path).unwrap_or(&path).display()
                )),
                Err(err) => warn!(path = %path.display(), error = %err, "could not remove"),
            }
        }
        done
    })?;
    Ok(done)
}

/// Unmounts and removes the shared lowers no snapshot uses, decided again under the lowers'
/// lock (a prepare records its row before it takes that lock to mount its lower).
fn remove_unused_lowers(root: &Root) -> Vec<String> {
    let unused = crate::snapshot::overlay::lock_lowers(&root.path).and_then(|lock| {
        Ok((
            lock,
            crate::snapshot::unused_lowers(root, &root.meta.snapshots()?),
        ))
    });
    let (_lock, unused) = match unused {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot list the unused shared lowers");
            return Vec::new();
        }
    };
    let mut done = Vec::new();
    for (_, path) in unused {
        let unmounted =
            if lazysnap_fuse::is_mountpoint(&path) || lazysnap_fuse::is_stale_mount(&path) {
                lazysnap_fuse::unmount(&path).map(|_| ())
            } else {
                Ok(())
            };
        match unmounted
            .map_err(io::Error::other)
            .and_then(|()| std::fs::remove_dir(&path))
        {
            Ok(()) => done.push(format!("removed unused shared lower {}", rel(root, &path))),
            Err(e) => warn!(path = %path.display(), error = %e, "could not remove"),
        }
    }
    done
}

/// Unmounts a filesystem a surviving daemon may serve on the orphan's `mnt`, then removes it.
fn remove_orphan_dir(dir: &Path) -> io::Result<()> {
    let mnt = std::path::absolute(dir.join("mnt"))?;
    if lazysnap_fuse::is_stale_mount(&mnt) || lazysnap_fuse::is_mountpoint(&mnt) {
        lazysnap_fuse::unmount(&mnt).map_err(io::Error::other)?;
    }
    std::fs::remove_dir_all(dir)
}

/// Rebuilds missing or corrupt index files, span maps and local copies from their blobs.
/// Returns what was rebuilt and the blobs whose derived files could not be (their blob is
/// missing or does not index): what needs them is removed like what needs a missing blob.
fn rebuild_derived(
    root: &mut Root,
    derived: &[&Problem],
    missing: &[String],
) -> Result<(Vec<String>, Vec<String>)> {
    let bad: HashSet<&str> = derived.iter().map(|p| p.subject.as_str()).collect();
    let mut done = Vec::new();
    let mut lost = Vec::new();
    let layers: BTreeMap<String, crate::meta::LayerRow> = root
        .meta
        .layers()?
        .into_iter()
        .map(|l| (l.diff_id.clone(), l))
        .collect();
    for b in root.meta.blobs()? {
        let Some(layer) = layers.get(&b.diff_id) else {
            continue;
        };
        let touched = bad.contains(layer.index_path.as_str())
            || bad.contains(b.spans_path.as_str())
            || b.local_copy.as_deref().is_some_and(|c| bad.contains(c));
        if !touched {
            continue;
        }
        let rebuilt = (|| -> anyhow::Result<()> {
            if missing.contains(&b.digest) {
                anyhow::bail!("the blob is missing");
            }
            let digest = Digest::parse(&b.digest)?;
            // A lazily pulled blob is downloaded to index it; it is then an ordinary one.
            if b.remote.is_some() {
                crate::registry::lazy::ensure_local(root, &digest)?;
            }
            let diff_id = Digest::parse(&b.diff_id)?;
            let compression = crate::image::parse_compression(&b.compression)
                .ok_or_else(|| anyhow::anyhow!("unknown compression {}", b.compression))?;
            // index_blob keeps an index file that exists: the corrupt one must go first.
            if bad.contains(layer.index_path.as_str()) {
                match std::fs::remove_file(root.abs(&layer.index_path)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let indexed = crate::unpack::index_blob(
                &root.path,
                &root.store.blob_path(&digest),
                &crate::image::LayerDesc {
                    desc: crate::image::Desc {
                        media_type: b.media_type.clone(),
                        digest,
                        size: b.size,
                    },
                    compression,
                    diff_id,
                },
                Arc::new(crate::unpack::UnpackProgress::default()),
                &root.limits,
            )?;
            if b.remote.is_some() {
                root.meta.make_local(&indexed.layer, &indexed.blob)?;
                return Ok(());
            }
            if indexed.layer.index_path != layer.index_path
                || indexed.blob.spans_path != b.spans_path
                || indexed.blob.local_copy != b.local_copy
            {
                anyhow::bail!("indexing again gave other files than the rows name");
            }
            Ok(())
        })();
        match rebuilt {
            Ok(()) => done.push(format!(
                "rebuilt the index files of blob {} (layer {})",
                b.digest, b.diff_id
            )),
            Err(e) => {
                warn!(blob = %b.digest, error = %format!("{e:#}"), "cannot rebuild its index files");
                lost.push(b.digest.clone());
            }
        }
    }
    Ok((done, lost))
}

/// What gc would remove now: blobs and index files nothing references once metadata
/// garbage is collected (computed in a rolled-back transaction).
pub fn reclaimable(root: &mut Root) -> Result<Reclaimable> {
    let live = root.meta.referenced_after_gc()?;
    let mut out = Reclaimable::default();
    for d in root.store.list().map_err(|e| CheckError::Io {
        context: "listing blobs".into(),
        source: io::Error::other(e.to_string()),
    })? {
        if !live.blobs.contains(d.as_str()) {
            out.blobs += 1;
            out.blob_bytes += std::fs::metadata(root.store.blob_path(&d))
                .map(|m| m.len())
                .unwrap_or(0);
        }
    }
    for e in std::fs::read_dir(root.index_dir()).map_err(io_err("listing index"))? {
        let e = e.map_err(io_err("listing index"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::root::is_temp_name(&name) {
            continue;
        }
        if !live.files.contains(&format!("index/{name}")) {
            out.index_files += 1;
            out.index_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(out)
}

fn rel(root: &Root, p: &Path) -> String {
    p.strip_prefix(&root.path)
        .unwrap_or(p)
        .display()
        .to_string()
}

impl Report {
    /// The report for people: one line per problem, then the figures.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        if !self.found.is_empty() || !self.repaired.is_empty() {
            let _ = writeln!(s, "found {} problem(s):", self.found.len());
            for p in &self.found {
                let _ = writeln!(s, "  {:?} {}: {}", p.kind, p.subject, p.detail);
            }
            for l in &self.found_leftovers {
                let _ = writeln!(
                    s,
                    "  leftover {:?} {}: {} bytes",
                    l.kind, l.subject, l.bytes
                );
            }
            for r in &self.repaired {
                let _ = writeln!(s, "repaired: {r}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "problem: {:?} {}: {}", p.kind, p.subject, p.detail);
        }
        for l in &self.leftovers {
            let _ = writeln!(
                s,
                "leftover: {:?} {}: {} bytes {}; {}",
                l.kind, l.subject, l.bytes, l.detail, l.removed_by
            );
        }
        let _ = writeln!(
            s,
            "checked {} blobs{}, {} layers, {} snapshots",
            self.checked.blobs,
            if self.digests_verified {
                format!(" ({} bytes hashed)", self.checked.bytes_hashed)
            } else {
                " (sizes; --verify-digests hashes them)".into()
            },
            self.checked.layers,
            self.checked.snapshots
        );
        let _ = writeln!(
            s,
            "reclaimable by gc: {} blobs ({} bytes), {} index files ({} bytes)",
            self.reclaimable.blobs,
            self.reclaimable.blob_bytes,
            self.reclaimable.index_files,
            self.reclaimable.index_bytes
        );
        let _ = writeln!(
            s,
            "{}",
            if self.consistent && !self.leftovers.is_empty() {
                format!(
                    "consistent ({} leftover(s) of interrupted writes, {} bytes, nothing lost)",
                    self.leftovers.len(),
                    self.leftovers.iter().map(|l| l.bytes).sum::<u64>()
                )
            } else if self.consistent {
                "consistent".to_string()
            } else {
                format!("NOT consistent: {} problem(s)", self.problems.len())
            }
        );
        s
    }
}
