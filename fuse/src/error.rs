//! Errors of mounting and unmounting.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("mountpoint {}: {source}", path.display())]
    Mountpoint { path: PathBuf, source: io::Error },
    #[error("{} is the stale mount of a dead FUSE daemon: unmount it first", .0.display())]
    StaleMount(PathBuf),
    #[error("FUSE is not usable: {0}")]
    Unavailable(String),
    #[error("mounting FUSE at {}: {source}", path.display())]
    Mount { path: PathBuf, source: io::Error },
    #[error("unmounting {}: {source}", path.display())]
    Unmount { path: PathBuf, source: io::Error },
    #[error("fusermount3 -u {} failed: {message}", path.display())]
    Fusermount { path: PathBuf, message: String },
    #[error("upper directory {}: {source}", path.display())]
    Upper { path: PathBuf, source: io::Error },
    #[error("the FUSE session at {} ended with an error: {source}", path.display())]
    Session { path: PathBuf, source: io::Error },
}
