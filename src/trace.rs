//! Access traces of lazily pulled layers: which files a container read first, in what order
//! and how far, per layer (`traces/<blob hex>.json`). The first mount of a lazily pulled layer
//! records one; later mounts fetch the traced bytes first thing (`pull --lazy --prefetch`:
//! before the pull returns), in parallel range requests, and `index push` ships the trace with
//! the index so other nodes do too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::index::{Kind, LayerIndex, WHITEOUT};

/// Directory under the root.
pub const DIR: &str = "traces";
/// Recording stops this long after the mount (startup is what prefetch is for) ...
const RECORD_FOR: Duration = Duration::from_secs(120);
/// ... or after this many files.
const MAX_FILES: usize = 20_000;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

pub fn path(root: &Path, blob: &Digest) -> PathBuf {
    root.join(DIR).join(format!("{}.json", blob.hex()))
}

/// One file read: its node in the layer index and how far into it reads went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub node: u32,
    pub read_end: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trace {
    /// In the order of first read.
    pub files: Vec<Access>,
    /// The files' paths, for people (`lazysnap trace`).
    #[serde(default)]
    pub paths: Vec<String>,
}

impl Trace {
    pub fn load(root: &Path, blob: &Digest) -> Option<Trace> {
        let data = std::fs::read(path(root, blob)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    pub fn save(&self, root: &Path, blob: &Digest) -> anyhow::Result<()> {
        let p = path(root, blob);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::store::write_atomic(&p, &serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    /// The uncompressed byte ranges of the layer stream the traced reads touched, in order
    /// (sparse files: their stored data, from its start).
    pub fn stream_ranges(&self, index: &LayerIndex) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for a in &self.files {
            let Some(n) = index.nodes.get(a.node as usize) else {
                continue;
            };
            if n.kind != Kind::File {
                continue;
            }
            let stored: u64 = {
                let ext = index.sparse.get(n.sparse.as_range()).unwrap_or(&[]);
                if ext.is_empty() {
                    n.size
                } else {
                    ext.iter().map(|e| e.1).sum()
                }
            };
            let len = a.read_end.min(stored);
            if len > 0 {
                out.push((n.data_offset, n.data_offset + len));
            }
        }
        out
    }
}

/// Paths of an index's file nodes (first name of each), for display.
pub fn node_paths(index: &LayerIndex) -> HashMap<u32, String> {
    fn dir_path(index: &LayerIndex, dir: u32, memo: &mut HashMap<u32, String>) -> String {
        if dir == 0 {
            return String::new();
        }
        if let Some(p) = memo.get(&dir) {
            return p.clone();
        }
        let Some(n) = index.nodes.get(dir as usize) else {
            return String::new();
        };
        let name = index
            .dirents
            .get(n.parent_dirent as usize)
            .map(|d| String::from_utf8_lossy(index.bytes_of(d.name)).into_owned())
            .unwrap_or_default();
        let p = format!("{}/{name}", dir_path(index, n.parent, memo));
        memo.insert(dir, p.clone());
        p
    }
    let mut memo = HashMap::new();
    let mut out = HashMap::new();
    for (dir, n) in index.nodes.iter().enumerate() {
        if n.kind != Kind::Dir {
            continue;
        }
        let base = dir_path(index, dir as u32, &mut memo);
        for d in index.children(dir as u32) {
            if d.target != WHITEOUT {
                out.entry(d.target).or_insert_with(|| {
                    format!("{base}/{}", String::from_utf8_lossy(index.bytes_of(d.name)))
                });
            }
        }
    }
    out
}

/// Records a layer's first reads while it is mounted, writing the trace every second.
pub struct Recorder {
    root: PathBuf,
    blob: Digest,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    files: Vec<Access>,
    at: HashMap<u32, usize>,
    dirty: bool,
}

impl Recorder {
    /// A recorder for `blob`, unless it has a trace already (the first run is the one).
    pub fn start(root: &Path, blob: &Digest) -> Option<Arc<Recorder>> {
        if path(root, blob).exists() {
            return None;
        }
        let r = Arc::new(Recorder {
            root: root.to_path_buf(),
            blob: blob.clone(),
            started: Instant::now(),
            state: Mutex::new(State::default()),
        });
        let weak: Weak<Recorder> = Arc::downgrade(&r);
        let _ = std::thread::Builder::new()
            .name("lazysnap-trace".into())
            .spawn(move || loop {
                std::thread::sleep(FLUSH_EVERY);
                let Some(r) = weak.upgrade() else { break };
                r.flush();
                if r.started.elapsed() > RECORD_FOR + FLUSH_EVERY {
                    break;
                }
            });
        Some(r)
    }

    pub fn record(&self, node: u32, read_end: u64) {
        if self.started.elapsed() > RECORD_FOR {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.at.get(&node).copied() {
            Some(i) if s.files[i].read_end < read_end => {
                s.files[i].read_end = read_end;
                s.dirty = true;
            }
            Some(_) => {}
            None if s.files.len() < MAX_FILES => {
                let i = s.files.len();
                s.files.push(Access { node, read_end });
                s.at.insert(node, i);
                s.dirty = true;
            }
            None => {}
        }
    }

    /// Writes the trace if it changed (paths are resolved by `lazysnap trace`, not here).
    pub fn flush(&self) {
        let files = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !s.dirty {
                return;
            }
            s.dirty = false;
            s.files.clone()
        };
        let t = Trace {
            files,
            paths: Vec::new(),
        };
        if let Err(e) = t.save(&self.root, &self.blob) {
            tracing::warn!(blob = %self.blob, error = %e, "could not write the access trace");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}
