//! lazysnap: mount container image root filesystems lazily, without extracting them.
//!
//! See ARCHITECTURE.md for the codemap. The pieces, each knowing only what it must:
//! [`store`] (blobs), [`image`] (OCI/docker formats), [`index`] (tar → layer index),
//! [`blob`] (random access into compressed blobs), [`meta`] (SQLite), [`unpack`] and
//! [`import`] (orchestration), [`layer`] (a layer behind the fuse crate's trait).

pub mod blob;
pub mod check;
pub mod chunks;
pub mod df;
pub mod digest;
pub mod export;
pub mod gc;
pub mod image;
pub mod import;
pub mod index;
pub mod keeper;
pub mod layer;
pub mod meta;
pub mod mount;
pub mod recompress;
pub mod registry;
pub mod root;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod tee;
pub mod trace;
pub mod unpack;
