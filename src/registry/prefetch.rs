//! Parallel layer downloads: when the first layer of a manifest is opened (its config has been
//! read and its platform checked by then), the other layers are downloaded by a few worker
//! threads into the content store (digest and size checked by `ContentStore::ingest`), each
//! indexed from its download stream (`tee.rs`). Opening a prefetched layer waits for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tracing::{debug_span, warn};

use super::blob::BlobStream;
use super::client::Client;
use super::RegistryError;
use crate::digest::Digest;
use crate::image::{layer_compression, Desc, LayerDesc};
use crate::store::ContentStore;
use crate::tee::tee_index;
use crate::unpack::{Indexed, Limits};

/// Downloads at once, besides the one the import pipeline streams itself.
pub const WORKERS: usize = 3;

pub type IndexHandle = JoinHandle<anyhow::Result<Indexed>>;
/// A prefetched blob: in the store (with its indexer, if one ran), or why not.
pub type Outcome = Result<Option<IndexHandle>, String>;

struct Shared {
    clients: Arc<Vec<Client>>,
    store: ContentStore,
    index_into: Option<PathBuf>,
    limits: Limits,
    queue: Mutex<VecDeque<Desc>>,
    done: Mutex<HashMap<Digest, Outcome>>,
    cv: Condvar,
}

pub struct Prefetcher {
    shared: Arc<Shared>,
    /// Every blob handed to the workers.
    known: HashSet<Digest>,
    workers: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(
        clients: Arc<Vec<Client>>,
        store: ContentStore,
        index_into: Option<PathBuf>,
        limits: Limits,
        blobs: Vec<Desc>,
    ) -> Self {
        let known = blobs.iter().map(|d| d.digest.clone()).collect();
        let n = blobs.len().min(WORKERS);
        let shared = Arc::new(Shared {
            clients,
            store,
            index_into,
            limits,
            queue: Mutex::new(blobs.into()),
            done: Mutex::new(HashMap::new()),
            cv: Condvar::new(),
        });
        let workers = (0..n)
            .map(|_| {
                let s = shared.clone();
                std::thread::spawn(move || worker(&s))
            })
            .collect();
        Self {
            shared,
            known,
            workers,
        }
    }

    pub fn knows(&self, digest: &Digest) -> bool {
        self.known.contains(digest)
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        self.known.iter()
    }

    /// Waits until `digest` is downloaded (or failed). `None` when it was not prefetched or its
    /// outcome was already taken.
    pub fn wait(&self, digest: &Digest) -> Option<Outcome> {
        if !self.knows(digest) {
            return None;
        }
        let mut done = self.shared.done.lock().ok()?;
        loop {
            if let Some(o) = done.remove(digest) {
                return Some(o);
            }
            let queued = self
                .shared
                .queue
                .lock()
                .map(|q| q.iter().any(|d| &d.digest == digest))
                .unwrap_or(false);
            let running = self.workers.iter().any(|w| !w.is_finished());
            if !queued && !running {
                return None;
            }
            done = self.shared.cv.wait(done).ok()?;
        }
    }

    /// The indexer of a prefetched blob, if it finished downloading with one.
    pub fn take_index(&self, digest: &Digest) -> Option<IndexHandle> {
        let mut done = self.shared.done.lock().ok()?;
        match done.remove(digest) {
            Some(Ok(Some(h))) => Some(h),
            Some(other) => {
                done.insert(digest.clone(), other);
                None
            }
            None => None,
        }
    }

    /// Stops taking new blobs, waits for the downloads and indexers in flight.
    pub fn finish(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.clear();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Ok(mut done) = self.shared.done.lock() {
            for (_, o) in done.drain() {
                if let Ok(Some(h)) = o {
                    let _ = h.join();
                }
            }
        }
    }
}

fn worker(s: &Shared) {
    loop {
        let next = s.queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some(desc) = next else { return };
        let outcome = fetch(s, &desc);
        if let Err(e) = &outcome {
            warn!(blob = %desc.digest, error = %e, "prefetch failed");
        }
        if let Ok(mut done) = s.done.lock() {
            done.insert(desc.digest.clone(), outcome);
        }
        s.cv.notify_all();
    }
}

fn fetch(s: &Shared, desc: &Desc) -> Outcome {
    let _span = debug_span!("prefetch", blob = %desc.digest).entered();
    let mut stream = None;
    let mut last: Option<RegistryError> = None;
    for c in s.clients.iter() {
        match BlobStream::open(c, &desc.digest) {
            Ok(st) => {
                stream = Some(st);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = match stream {
        Some(st) => st,
        None => {
            return Err(last
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no registry endpoint".into()))
        }
    };
    let compression = layer_compression(&desc.media_type);
    let (result, handle) = match (&s.index_into, compression) {
        (Some(root), Some(compression)) => {
            let layer = LayerDesc {
                desc: desc.clone(),
                compression,
                diff_id: desc.digest.clone(),
            };
            let (mut tee, handle) = tee_index(stream, root.clone(), layer, s.limits);
            let r = s
                .store
                .ingest(&desc.digest, Some(desc.size), &mut tee, &mut |_| {});
            drop(tee);
            (r, Some(handle))
        }
        _ => {
            let mut stream = stream;
            let r = s
                .store
                .ingest(&desc.digest, Some(desc.size), &mut stream, &mut |_| {});
            (r, None)
        }
    };
    match result {
        Ok(_) => Ok(handle),
        Err(e) => {
            if let Some(h) = handle {
                let _ = h.join();
            }
            Err(e.to_string())
        }
    }
}
