//! lazysnap's filesystem: a merged view of a stack of read-only layer trees, served through FUSE.
//! It knows nothing of OCI, tar or SQLite: layers come through the [`LayerTree`] trait.
//!
//! - [`merge`]: the overlay rules and the inode table, without FUSE;
//! - [`fs`]: [`MergedFs`], the `fuser::Filesystem` answering from a merged view;
//! - [`mount()`]: mounting in the background, unmounting, stale-mount detection;
//! - [`mem`] and [`reference`]: an in-memory layer and a naive `tar -x` model, for tests.

mod error;
pub mod fs;
pub mod layer;
pub mod mem;
pub mod merge;
mod mount;
pub mod reference;

pub use error::FuseError;
pub use fs::MergedFs;
pub use layer::{DirEntry, LayerStack, LayerTree, NodeAttr, NodeId, NodeKind, Timestamp};
pub use merge::{Ino, Merged, ROOT_INO};
pub use mount::{
    fuser_config, is_mountpoint, is_stale_mount, mount, unmount, MountHandle, MountOptions,
};
