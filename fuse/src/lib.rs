//! lazysnap's filesystem: a merged view of a stack of read-only layer trees, served through FUSE.
//! It knows nothing of OCI, tar or SQLite: layers come through the [`LayerTree`] trait.

pub mod layer;

pub use layer::{DirEntry, LayerStack, LayerTree, NodeAttr, NodeId, NodeKind, Timestamp};
