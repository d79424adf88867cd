//! A bounded set of `O_PATH` fds of upper entries. The kernel may remember millions of inodes
//! (entries are cached for a year), but a process holds only so many fds (`ulimit -n`: often
//! 1024, and an unprivileged user cannot raise the hard limit). So an fd is kept only while it
//! is among the most recently used; the others are closed and opened again from the parent
//! chain when needed ([`crate::merge::Merged::upper_fd`]).

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

use super::Ino;
use crate::host::HostId;

/// Fewest and most fds kept, whatever the limit.
const MIN_FDS: usize = 16;
const MAX_FDS: usize = 16 * 1024;

/// The fds of the most recently used upper entries, by inode. Each fd is stored with the host
/// identity it was opened for, so an inode whose upper entry changed never gets an old fd.
pub(crate) struct FdCache {
    lru: Mutex<LruCache<Ino, (HostId, Arc<OwnedFd>)>>,
}

impl std::fmt::Debug for FdCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdCache").field("len", &self.len()).finish()
    }
}

/// How many fds to keep under a soft limit of `limit` open files: a quarter, leaving the rest
/// to open file handles (one per file a program holds open), layer blobs and sockets.
pub fn capacity_for(limit: u64) -> usize {
    usize::try_from(limit / 4)
        .unwrap_or(MAX_FDS)
        .clamp(MIN_FDS, MAX_FDS)
}

/// This process's soft limit on open files.
fn soft_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a plain struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

impl FdCache {
    pub fn new(capacity: usize) -> FdCache {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        FdCache {
            lru: Mutex::new(LruCache::new(cap)),
        }
    }

    /// Sized for this process's open-file limit (read once, at mount).
    pub fn for_this_process() -> FdCache {
        let cap = capacity_for(soft_limit());
        tracing::debug!(fds = cap, "upper fd cache");
        FdCache::new(cap)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Ino, (HostId, Arc<OwnedFd>)>> {
        self.lru.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fd of `ino`'s upper entry `id`, if kept.
    pub fn get(&self, ino: Ino, id: HostId) -> Option<Arc<OwnedFd>> {
        let mut lru = self.lock();
        match lru.get(&ino) {
            Some((kept, fd)) if *kept == id => Some(fd.clone()),
            Some(_) => {
                lru.pop(&ino);
                None
            }
            None => None,
        }
    }

    /// Keeps `fd` as `ino`'s upper entry `id`; the least recently used one may be closed (once
    /// nobody is using it).
    pub fn put(&self, ino: Ino, id: HostId, fd: Arc<OwnedFd>) {
        self.lock().put(ino, (id, fd));
    }

    pub fn remove(&self, ino: Ino) {
        self.lock().pop(&ino);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn some_fd() -> Arc<OwnedFd> {
        Arc::new(
            std::fs::File::open("/")
                .and_then(|f| f.as_fd().try_clone_to_owned())
                .expect("an fd of /"),
        )
    }

    #[test]
    fn keeps_at_most_its_capacity_and_drops_the_least_recently_used() {
        let c = FdCache::new(2);
        c.put(1, (0, 1), some_fd());
        c.put(2, (0, 2), some_fd());
        assert!(c.get(1, (0, 1)).is_some());
        c.put(3, (0, 3), some_fd());
        assert_eq!(c.len(), 2);
        assert!(c.get(2, (0, 2)).is_none(), "2 was the least recently used");
        assert!(c.get(1, (0, 1)).is_some() && c.get(3, (0, 3)).is_some());
    }

    #[test]
    fn an_fd_kept_for_another_host_entry_is_not_handed_out() {
        let c = FdCache::new(4);
        c.put(1, (0, 1), some_fd());
        assert!(c.get(1, (0, 9)).is_none());
        assert!(c.get(1, (0, 1)).is_none(), "the stale fd was dropped");
    }

    #[test]
    fn capacity_follows_the_limit_within_bounds() {
        assert_eq!(capacity_for(256), 64);
        assert_eq!(capacity_for(1024), 256);
        assert_eq!(capacity_for(20), MIN_FDS);
        assert_eq!(capacity_for(u64::MAX), MAX_FDS);
    }
}
