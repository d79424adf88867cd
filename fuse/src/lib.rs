//! lazysnap's filesystem: a merged view of a stack of read-only layer trees, served through FUSE.
//! It knows nothing of OCI, tar or SQLite: layers come through the [`LayerTree`] trait.
//!
//! Layers, each using only those below it (checked by `tests/layering.rs`):
//!
//! 1. [`layer`] (the trait), [`host`] (the `*at()` syscalls on O_PATH fds), `error`;
//! 2. [`ownership`] (the `user.lazysnap.override` record), [`owners`] (whose ids a mount shows,
//!    who counts as root), and for tests [`mem`] (an in-memory layer) and [`mod@reference`] (a naive
//!    `tar -x` model);
//! 3. [`upper`]: one upper directory's on-disk form (whiteout files, the opaque marker, attrs
//!    with the override applied), read and written; it knows nothing of merging;
//! 4. [`merge`]: the overlay rules and the inode table, without FUSE; `merge::write` its writing
//!    half (copy-up, whiteouts, renames), its fd cache the bounded table of upper fds;
//! 5. [`fs`]: [`MergedFs`], the `fuser::Filesystem` answering from a merged view;
//! 6. [`mount()`]: mounting in the background, unmounting, stale-mount detection.
//!
//! ## The writable upper directory
//!
//! An active snapshot mounts with [`MountOptions::upper`]: a host directory that holds the
//! changes as an OCI layer in directory form, so that committing is taring it as it is.
//!
//! - Deletions are empty regular files `.wh.NAME`; a directory whose lower content is hidden
//!   holds an empty `.wh..wh..opq`. No `mknod` whiteouts, no `trusted.*` xattrs: it works
//!   rootless. Users cannot create `.wh.*` names (`EINVAL`), and the upper's are never shown.
//! - Ownership: as root, chown/chmod/mknod act on the upper file. Without root (or with
//!   [`MountOptions::record_ownership_in_xattr`]) the container's uid:gid:mode(:major:minor) is
//!   recorded in `user.lazysnap.override` ([`ownership`]); [`read_override`] reads it back.
//! - Copy-up happens on the first change of a lower entry: parents first (with their mode,
//!   owner, times and xattrs), data through `LayerTree::read_at` with holes kept, into a temp
//!   name renamed into place. Inode numbers do not change.
//! - Hardlinks: a lower file with several visible names is copied up once and its other names
//!   are hard-linked to the copy, so the group stays a group (a write through one name shows
//!   through the others, nlink stays right) and a commit carries it as tar hardlinks.
//! - The upper is only touched through directory fds and single-name `*at()` calls that never
//!   follow symlinks ([`host`]): a symlink in the upper cannot lead a write outside it.

mod error;
pub mod fs;
pub mod host;
pub mod layer;
pub mod mem;
pub mod merge;
mod mount;
pub mod owners;
pub mod ownership;
pub mod reference;
pub mod upper;

pub use error::FuseError;
pub use fs::{Gate, MergedFs};
pub use layer::{DirEntry, LayerStack, LayerTree, NodeAttr, NodeId, NodeKind, Timestamp, Xattrs};
pub use merge::{Ino, Merged, INO_SCHEME, ROOT_INO};
pub use mount::{
    connection_gone, fuser_config, is_mountpoint, is_stale_mount, mount, mountpoints,
    resend_pending, serve_taken_over, unmount, MountHandle, MountOptions,
};
pub use owners::{in_user_namespace, privileged, Owners};
pub use ownership::{read_override, Override};
