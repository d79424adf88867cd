//! Process-wide LRU of decompressed spans, bounded in bytes.
//!
//! The global lock only guards the LRU and the in-flight table; decompression runs outside it,
//! and concurrent readers of the same missing span wait for the one decompressing it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use lru::LruCache;

use super::Result;

/// (reader id, span index).
pub(crate) type SpanKey = (u64, usize);

/// A decompressed span, shared by the cache and its readers (decoded in place, never copied).
pub(crate) type SpanData = Arc<Vec<u8>>;

/// Shared LRU of decompressed spans, bounded in bytes; one per process/mount.
pub struct SpanCache {
    max_bytes: u64,
    state: Mutex<State>,
}

struct State {
    lru: LruCache<SpanKey, SpanData>,
    bytes: u64,
    inflight: HashMap<SpanKey, Arc<Flight>>,
}

/// One decompression in progress; waiters block on `cv` until `done` is set.
#[derive(Default)]
struct Flight {
    /// `Some(Some(data))` on success, `Some(None)` when the loader failed (waiters retry).
    done: Mutex<Option<Option<SpanData>>>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking loader must not wedge every other reader: the state stays consistent because
    // every critical section below is a few map operations.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for SpanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanCache")
            .field("max_bytes", &self.max_bytes)
            .field("used_bytes", &self.used_bytes())
            .finish()
    }
}

impl SpanCache {
    pub fn new(max_bytes: u64) -> Arc<Self> {
        Arc::new(SpanCache {
            max_bytes,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
            }),
        })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes of decompressed spans held now.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.state).bytes
    }

    /// Number of spans held now.
    pub fn len(&self) -> usize {
        lock(&self.state).lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the cached span, or runs `load` (outside the lock) and caches its result unless
    /// `closed` is set by then (the reader went away: [`SpanCache::forget_blob`] ran or will).
    /// Only one caller loads a given key at a time; the others wait for its result.
    pub(crate) fn get_or_load<F>(
        &self,
        key: SpanKey,
        closed: &AtomicBool,
        load: F,
    ) -> Result<SpanData>
    where
        F: FnOnce() -> Result<SpanData>,
    {
        let mut load = Some(load);
        loop {
            let flight = {
                let mut st = lock(&self.state);
                if let Some(v) = st.lru.get(&key) {
                    return Ok(v.clone());
                }
                match st.inflight.get(&key) {
                    Some(f) => f.clone(),
                    None => {
                        let f = Arc::new(Flight::default());
                        st.inflight.insert(key, f.clone());
                        drop(st);
                        let Some(load) = load.take() else {
                            // Unreachable: we only load once, and return right after.
                            return Err(super::BlobError::Internal("span loader reused".into()));
                        };
                        return self.run(key, closed, f, load);
                    }
                }
            };
            let mut done = lock(&flight.done);
            while done.is_none() {
                done = flight.cv.wait(done).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(Some(v)) = done.as_ref() {
                return Ok(v.clone());
            }
            // The loader failed: try ourselves, so each caller gets its own error.
        }
    }

    fn run<F>(
        &self,
        key: SpanKey,
        closed: &AtomicBool,
        flight: Arc<Flight>,
        load: F,
    ) -> Result<SpanData>
    where
        F: FnOnce() -> Result<SpanData>,
    {
        // Wakes the waiters even if `load` panics.
        struct Finish<'a> {
            cache: &'a SpanCache,
            closed: &'a AtomicBool,
            key: SpanKey,
            flight: Arc<Flight>,
            value: Option<SpanData>,
        }
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                {
                    let mut st = lock(&self.cache.state);
                    st.inflight.remove(&self.key);
                    // Checked under the lock that forget_blob takes after setting it.
                    let closed = self.closed.load(Ordering::Acquire);
                    if let (Some(v), false) = (&self.value, closed) {
                        self.cache.insert_locked(&mut st, self.key, v.clone());
                    }
                }
                *lock(&self.flight.done) = Some(self.value.take());
                self.flight.cv.notify_all();
            }
        }
        let mut fin = Finish {
            cache: self,
            closed,
            key,
            flight,
            value: None,
        };
        let v = load()?;
        fin.value = Some(v.clone());
        Ok(v)
    }

    fn insert_locked(&self, st: &mut State, key: SpanKey, v: SpanData) {
        let size = v.len() as u64;
        if size > self.max_bytes {
            return;
        }
        if let Some(old) = st.lru.put(key, v) {
            st.bytes -= old.len() as u64;
        }
        st.bytes += size;
        while st.bytes > self.max_bytes {
            match st.lru.pop_lru() {
                Some((_, old)) => st.bytes -= old.len() as u64,
                None => break,
            }
        }
    }

    /// Whether `key` is cached or being loaded (does not count as a use).
    pub(crate) fn has(&self, key: SpanKey) -> bool {
        let st = lock(&self.state);
        st.lru.contains(&key) || st.inflight.contains_key(&key)
    }

    /// Drops every span of one reader (called when the reader goes away).
    pub(crate) fn forget_blob(&self, id: u64) {
        let mut st = lock(&self.state);
        let keys: Vec<SpanKey> = st
            .lru
            .iter()
            .filter(|(k, _)| k.0 == id)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(old) = st.lru.pop(&k) {
                st.bytes -= old.len() as u64;
            }
        }
    }
}
