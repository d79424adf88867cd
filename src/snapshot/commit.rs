//! Commit: the upper directory of an active snapshot becomes a layer. The upper already is an
//! OCI layer in directory form (`.wh.NAME` whiteouts, `.wh..wh..opq` opaque markers), so this
//! tars it (PAX: xattrs, nanosecond times; hardlinks kept), compresses it (zstd in 4 MiB
//! frames, so no local seekable copy is needed) and stores the blob while an indexer thread
//! indexes the same bytes, as an import would. The upper is walked only through directory fds and
//! `*at()` calls with `O_NOFOLLOW`: a symlink in the snapshot never leads outside it.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use sha2::{Digest as _, Sha256};

use crate::blob::encode::LayerEncoder;
use crate::blob::Compression;
use crate::digest::{Digest, HashWriter};
use crate::image::resolve::Desc;
use crate::image::LayerDesc;
use crate::meta::{BlobRow, ChainRow, LayerRow};
use crate::root::Root;
use crate::unpack::{index_blob, UnpackProgress};

/// Temp names the fuse crate uses inside the upper while copying up; never part of a layer.
const UPPER_TEMP_PREFIX: &[u8] = b".wh..lazysnap-tmp.";

/// The form an upper directory holds its change in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperFormat {
    /// lazysnap's FUSE upper: an OCI layer in directory form (`.wh.` files), tarred as it is.
    OciDir,
    /// The kernel overlayfs's: a whiteout is a 0/0 character device (or a file carrying
    /// `*.overlay.whiteout`), an opaque directory carries `*.overlay.opaque` = `y`; both become
    /// OCI `.wh.` entries and overlay's own xattrs are left out.
    Overlay,
}

/// Overlay's xattr namespaces (`trusted.` as root, `user.` with `userxattr`).
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

fn overlay_xattr<'a>(xattrs: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    xattrs
        .iter()
        .find(|(k, _)| {
            OVERLAY_XATTR_PREFIXES
                .iter()
                .any(|p| k.strip_prefix(p) == Some(name))
        })
        .map(|(_, v)| v.as_slice())
}

fn is_overlay_xattr(name: &str) -> bool {
    OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p))
}

pub struct Made {
    pub layer: LayerRow,
    pub blob: BlobRow,
    pub chain: ChainRow,
}

/// Tars `upper` into a new layer blob on top of `parent_chain`, indexes it, and returns the
/// rows to record (the caller records them in one transaction with the snapshot).
pub fn commit_upper(
    root: &mut Root,
    upper: &Path,
    format: UpperFormat,
    parent_chain: Option<&str>,
    compression: Compression,
) -> anyhow::Result<Made> {
    // One pass: the compressed bytes go to the content store and, through a bounded channel,
    // to an indexer thread, so the new blob is not read back (the tar walk and compression
    // on one core, decompression and indexing on the other). The indexer names its span map
    // after a placeholder digest until the blob's is known.
    let placeholder = placeholder_digest()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let indexer = {
        let root_path = root.path.clone();
        let layer = LayerDesc {
            desc: Desc {
                media_type: crate::image::layer_media_type(compression).to_string(),
                digest: placeholder.clone(),
                size: 0,
            },
            compression,
            diff_id: placeholder.clone(),
        };
        std::thread::Builder::new()
            .name("commit-index".into())
            .spawn(move || {
                // The layer is the caller's own data: no decompression-bomb limits.
                let unlimited = crate::unpack::Limits {
                    max_layer_size: u64::MAX,
                    max_ratio: 0,
                };
                crate::unpack::index_stream(
                    &root_path,
                    crate::unpack::ChannelReader::new(rx),
                    &layer,
                    Arc::new(UnpackProgress::default()),
                    &unlimited,
                    u64::MAX,
                    false,
                )
            })
            .context("starting the indexer thread")?
    };
    // Overlay mode: the chain's shared read-only mount is the overlay's lower; a directory
    // the kernel renamed (`redirect_dir=on`) is filled from it.
    let lower = match (format, parent_chain) {
        (UpperFormat::Overlay, Some(chain)) => {
            Some(super::overlay::lower_mountpoint(&root.path, chain))
        }
        _ => None,
    };
    let written = write_blob(root, upper, lower.as_deref(), format, compression, tx);
    let indexed = indexer
        .join()
        .map_err(|_| anyhow::anyhow!("the commit's indexer thread panicked"))?;
    let (blob_digest, blob_size, diff_id) = written?;
    let layer = LayerDesc {
        desc: Desc {
            media_type: crate::image::layer_media_type(compression).to_string(),
            digest: blob_digest.clone(),
            size: blob_size,
        },
        compression,
        diff_id: diff_id.clone(),
    };
    let placeholder_spans = root.abs(&crate::unpack::spans_rel_path(&placeholder));
    let indexed = match indexed {
        Ok(mut ix) if ix.blob.local_copy.is_none() && ix.layer.diff_id == diff_id.as_str() => {
            let spans = crate::unpack::spans_rel_path(&blob_digest);
            std::fs::rename(&placeholder_spans, root.abs(&spans))
                .with_context(|| format!("naming the span map of {blob_digest}"))?;
            ix.blob.digest = blob_digest.to_string();
            ix.blob.size = blob_size;
            ix.blob.spans_path = spans;
            ix
        }
        other => {
            // Not expected (a big single frame needs a local copy; a failed pass): index the
            // stored blob the usual way.
            if let Err(e) = &other {
                tracing::warn!(error = %e, "indexing while writing failed; indexing the blob");
            }
            let _ = std::fs::remove_file(&placeholder_spans);
            let _ =
                std::fs::remove_file(root.abs(&crate::unpack::local_copy_rel_path(&placeholder)));
            index_blob(
                &root.path,
                &root.store.blob_path(&blob_digest),
                &layer,
                Arc::new(UnpackProgress::default()),
                &root.limits,
            )?
        }
    };
    chain_from_indexed(root, indexed, parent_chain)
}

/// Tars `upper` through the compressor into the content store, every compressed byte also
/// sent on `tx`; returns the blob's digest and size and the layer's diffID.
fn write_blob(
    root: &mut Root,
    upper: &Path,
    lower: Option<&Path>,
    format: UpperFormat,
    compression: Compression,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> anyhow::Result<(Digest, u64, Digest)> {
    let tee = TeeWriter {
        inner: root.store.writer()?,
        tx: Some(tx),
    };
    // Finishing the tee drops the sender: the indexer sees the end of the stream.
    let enc = LayerEncoder::new(tee, compression, crate::blob::DEFAULT_SPAN_SIZE)?;
    let (enc, diff) = write_tar(upper, lower, format, enc)?;
    let (d, s) = enc.finish()?.inner.commit()?;
    Ok((d, s, diff))
}

/// A name no blob has: sha256 of this process, the time and a counter.
fn placeholder_digest() -> anyhow::Result<Digest> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(b"lazysnap commit placeholder");
    h.update(std::process::id().to_le_bytes());
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    h.update(
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    Ok(Digest::parse(&format!(
        "sha256:{}",
        hex::encode(h.finalize())
    ))?)
}

/// A writer that also hands every byte written to an indexer (a bounded channel: the slower
/// side sets the pace). If the indexer stops, writing goes on without it.
struct TeeWriter<W: Write> {
    inner: W,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
}

impl<W: Write> Write for TeeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(tx) = &self.tx {
            if n > 0 && tx.send(buf[..n].to_vec()).is_err() {
                self.tx = None;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The chain level a freshly indexed layer makes on top of `parent_chain`.
pub fn chain_from_indexed(
    root: &Root,
    indexed: crate::unpack::Indexed,
    parent_chain: Option<&str>,
) -> anyhow::Result<Made> {
    let diff_id = Digest::parse(&indexed.layer.diff_id)?;
    let blob_digest = Digest::parse(&indexed.blob.digest)?;
    let (chain_id, depth) = match parent_chain {
        None => (diff_id.clone(), 1),
        Some(p) => {
            let parent = root
                .meta
                .chain(p)?
                .with_context(|| format!("parent chain {p} is not recorded"))?;
            let mut ids = vec![Digest::parse(p)?, diff_id.clone()];
            // chain(n) = sha256(chain(n-1) + " " + diff(n)); chain_ids does exactly that
            // when the first element is already a chain ID.
            ids = Digest::chain_ids(&ids);
            (ids[1].clone(), parent.depth + 1)
        }
    };
    Ok(Made {
        layer: indexed.layer,
        blob: indexed.blob,
        chain: ChainRow {
            chain_id: chain_id.to_string(),
            parent: parent_chain.map(str::to_string),
            diff_id: diff_id.to_string(),
            blob_digest: blob_digest.to_string(),
            depth,
        },
    })
}

/// The chain level of a blob that was already indexed (applied by the diff service).
pub fn chain_for_blob(root: &Root, blob: &str, parent_chain: Option<&str>) -> anyhow::Result<Made> {
    let blob_row = root
        .meta
        .blob(blob)?
        .with_context(|| format!("applied blob {blob} is not recorded"))?;
    let layer = root
        .meta
        .layer(&blob_row.diff_id)?
        .with_context(|| format!("layer {} is not recorded", blob_row.diff_id))?;
    chain_from_indexed(
        root,
        crate::unpack::Indexed {
            layer,
            blob: blob_row,
        },
        parent_chain,
    )
}

/// True when the upper holds nothing (the container or diff service changed nothing there).
pub fn upper_is_empty(upper: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(upper) {
        Ok(mut d) => Ok(d.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", upper.display())),
    }
}

/// Puts a blob of containerd's content store into lazysnap's: hardlinked when on the same
/// filesystem, else copied (digest checked).
fn store_external_blob(root: &Root, blob: &Path, digest: &Digest) -> anyhow::Result<()> {
    let target = root.store.blob_path(digest);
    if std::fs::hard_link(blob, &target).is_ok() {
        // The link must survive a crash as a renamed blob does.
        crate::store::sync_dir(root.store.blobs_dir())?;
    } else {
        let mut f = File::open(blob).with_context(|| format!("opening {}", blob.display()))?;
        root.store.ingest(digest, None, &mut f, &mut |_| {})?;
    }
    Ok(())
}

/// Brings a layer blob from outside (containerd's content store) into ours — a hardlink when
/// on the same filesystem, else a verified copy — and indexes it.
/// A blob lazysnap has indexed already is not indexed again; when it was pulled lazily, the
/// blob is still taken into the store, so reads stop going to the registry.
pub fn index_external_blob(
    root: &mut Root,
    blob: &Path,
    digest: &Digest,
    media_type: &str,
) -> anyhow::Result<crate::unpack::Indexed> {
    let target = root.store.blob_path(digest);
    if let Some(b) = root.meta.blob(digest.as_str())? {
        if let Some(l) = root.meta.layer(&b.diff_id)? {
            if root.abs(&l.index_path).is_file() && root.abs(&b.spans_path).is_file() {
                if !target.is_file() && blob.is_file() {
                    // A lazily pulled blob, now fetched by containerd: reads become local.
                    store_external_blob(root, blob, digest)?;
                }
                return Ok(crate::unpack::Indexed { layer: l, blob: b });
            }
        }
    }
    if !target.is_file() {
        store_external_blob(root, blob, digest)?;
    }
    let size = std::fs::metadata(&target)?.len();
    let mut magic = [0u8; 4];
    let n = io::Read::read(&mut File::open(&target)?, &mut magic)?;
    let compression = crate::image::layer_compression(media_type)
        .unwrap_or_else(|| Compression::sniff(&magic[..n]));
    // The diffID is what indexing computes; the expected one is unknown here, so index with a
    // placeholder check disabled.
    let layer = LayerDesc {
        desc: Desc {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            size,
        },
        compression,
        diff_id: Digest::sha256_of(b""),
    };
    crate::unpack::index_blob_unchecked(
        &root.path,
        &target,
        &layer,
        Arc::new(UnpackProgress::default()),
        &root.limits,
    )
}

fn write_tar<W: Write>(
    upper: &Path,
    lower: Option<&Path>,
    format: UpperFormat,
    out: W,
) -> anyhow::Result<(W, Digest)> {
    let dir = open_dir_nofollow(libc::AT_FDCWD, &path_cstring(upper.as_os_str())?)
        .with_context(|| format!("opening upper {}", upper.display()))?;
    // The diffID: the uncompressed tar's sha256, taken on its way to the compressor.
    let mut builder = tar::Builder::new(HashWriter::new(out));
    builder.mode(tar::HeaderMode::Complete);
    let mut w = Walker {
        builder,
        links: HashMap::new(),
        lower: lower.map(|p| LowerRoot {
            path: p.to_path_buf(),
            fd: None,
        }),
    };
    append_root(&dir, &mut w.builder)?;
    w.walk(&dir, b"", format, b"", false)?;
    let (out, digest, _) = w.builder.into_inner()?.finish();
    Ok((out, digest))
}

/// The overlay's lower (the chain's read-only lazysnap mount), opened on first need.
struct LowerRoot {
    path: std::path::PathBuf,
    fd: Option<OwnedFd>,
}

impl LowerRoot {
    /// The lower's directory at `rel` (components separated by `/`, no `.`/`..`), opened one
    /// name at a time with `O_NOFOLLOW`; None when it is not there (or not a directory).
    fn open(&mut self, rel: &[u8]) -> anyhow::Result<Option<OwnedFd>> {
        if self.fd.is_none() {
            let fd = open_dir_nofollow(libc::AT_FDCWD, &path_cstring(self.path.as_os_str())?)
                .with_context(|| format!("opening the lower {}", self.path.display()))?;
            self.fd = Some(fd);
        }
        let root = self.fd.as_ref().expect("opened above");
        let mut cur: Option<OwnedFd> = None;
        for name in rel.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            if name == b"." || name == b".." {
                bail!("redirect through {:?}", String::from_utf8_lossy(rel));
            }
            let at = cur.as_ref().unwrap_or(root).as_raw_fd();
            match open_dir_nofollow(at, &CString::new(name).context("file name with NUL")?) {
                Ok(fd) => cur = Some(fd),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("opening {} in the lower", String::from_utf8_lossy(rel))
                    })
                }
            }
        }
        Ok(Some(match cur {
            Some(fd) => fd,
            None => root.try_clone()?,
        }))
    }
}

/// The lower path a redirected directory stands for: an absolute redirect is a path from the
/// overlay's root, a relative one a name in the parent's lower directory (the kernel's
/// `ovl_lookup` rule). `lower_prefix` is the parent's lower path with a trailing `/`, or empty.
fn resolve_redirect(redirect: &[u8], lower_prefix: &[u8]) -> Vec<u8> {
    let mut p = match redirect.strip_prefix(b"/") {
        Some(abs) => abs.to_vec(),
        None => [lower_prefix, redirect].concat(),
    };
    while p.ends_with(b"/") {
        p.pop();
    }
    p.push(b'/');
    p
}

fn path_cstring(p: &OsStr) -> anyhow::Result<CString> {
    CString::new(p.as_bytes()).context("path contains a NUL byte")
}

fn open_dir_nofollow(dirfd: i32, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned on success.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstatat(dirfd: i32, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data written by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Lists a directory's entries (sorted, without . and ..) through its fd.
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    // Read through /proc/self/fd so no path of the host is involved.
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
        .collect::<io::Result<_>>()?;
    names.sort();
    Ok(names)
}

/// xattrs of `name` in `dirfd` (not following a symlink), as (name, value).
fn xattrs_at(dirfd: i32, name: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut path = format!("/proc/self/fd/{dirfd}/").into_bytes();
    path.extend_from_slice(name);
    let cpath = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: size probe then read into a buffer of that size.
    let len = unsafe { libc::llistxattr(cpath.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    let mut list = vec![0u8; len as usize];
    let len = unsafe { libc::llistxattr(cpath.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    list.truncate(len as usize);
    let mut out = Vec::new();
    for key in list.split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let ckey = CString::new(key).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let vlen =
            unsafe { libc::lgetxattr(cpath.as_ptr(), ckey.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            continue;
        }
        let mut value = vec![0u8; vlen as usize];
        let vlen = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                ckey.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vlen < 0 {
            continue;
        }
        value.truncate(vlen as usize);
        out.push((String::from_utf8_lossy(key).into_owned(), value));
    }
    Ok(out)
}

/// The upper root stands for the merged root (initialised from the parent's root at
/// prepare): written as `./` so mode, owner, times and xattrs of `/` carry over.
fn append_root<W: Write>(dir: &OwnedFd, builder: &mut tar::Builder<W>) -> anyhow::Result<()> {
    let dot = CString::new(".")?;
    let st = fstatat(dir.as_raw_fd(), &dot)?;
    let mut xattrs = xattrs_at(dir.as_raw_fd(), b".")?;
    xattrs.retain(|(k, _)| !is_overlay_xattr(k));
    let EntryMeta { uid, gid, perm, .. } = entry_meta(&st, &mut xattrs);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_uid(u64::from(uid));
    header.set_gid(u64::from(gid));
    header.set_mode(perm);
    header.set_mtime(st.st_mtime.max(0) as u64);
    header.set_size(0);
    let pax = pax_records(&st, &xattrs, uid, gid);
    builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    builder.append_data(&mut header, "./", io::empty())?;
    Ok(())
}

/// What a tar header says of an upper entry.
struct EntryMeta {
    fmt: u32,
    uid: u32,
    gid: u32,
    perm: u32,
    rdev: (u32, u32),
}

/// The host file's type, owner, mode and device number, overridden by what a mount without
/// privilege recorded in `user.lazysnap.override` (a device, fifo or socket is then a regular
/// file carrying its type); the mount's private xattrs are taken out of `xattrs`.
fn entry_meta(st: &libc::stat, xattrs: &mut Vec<(String, Vec<u8>)>) -> EntryMeta {
    let mut m = EntryMeta {
        fmt: st.st_mode & libc::S_IFMT,
        uid: st.st_uid,
        gid: st.st_gid,
        perm: st.st_mode & 0o7777,
        rdev: (libc::major(st.st_rdev), libc::minor(st.st_rdev)),
    };
    let recorded = xattrs
        .iter()
        .find(|(k, _)| k.as_bytes() == lazysnap_fuse::ownership::OVERRIDE_XATTR)
        .and_then(|(_, v)| lazysnap_fuse::Override::parse(v));
    if let Some(o) = recorded {
        (m.uid, m.gid, m.perm) = (o.uid, o.gid, o.mode & 0o7777);
        let t = o.mode & libc::S_IFMT;
        if t != 0 && m.fmt == libc::S_IFREG {
            m.fmt = t;
        }
        if matches!(t, libc::S_IFCHR | libc::S_IFBLK) {
            m.rdev = (libc::major(o.rdev), libc::minor(o.rdev));
        }
    }
    xattrs.retain(|(k, _)| !lazysnap_fuse::ownership::is_private(k.as_bytes()));
    m
}

/// The PAX records of an entry: nanosecond mtime, xattrs, and ids too large for the header.
fn pax_records(
    st: &libc::stat,
    xattrs: &[(String, Vec<u8>)],
    uid: u32,
    gid: u32,
) -> Vec<(String, Vec<u8>)> {
    let mut pax = vec![(
        "mtime".to_string(),
        format!("{}.{:09}", st.st_mtime, st.st_mtime_nsec).into_bytes(),
    )];
    for (k, v) in xattrs {
        pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
    }
    if uid > 0o7777777 {
        pax.push(("uid".into(), uid.to_string().into_bytes()));
    }
    if gid > 0o7777777 {
        pax.push(("gid".into(), gid.to_string().into_bytes()));
    }
    pax
}

/// An empty regular file entry: an OCI whiteout or opaque marker.
fn append_marker<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &[u8],
    mtime: i64,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mode(0o644);
    header.set_mtime(mtime.max(0) as u64);
    header.set_size(0);
    builder.append_data(&mut header, OsStr::from_bytes(path), io::empty())?;
    Ok(())
}

struct Walker<W: Write> {
    builder: tar::Builder<W>,
    links: HashMap<(u64, u64), Vec<u8>>,
    lower: Option<LowerRoot>,
}

impl<W: Write> Walker<W> {
    /// Tars the entries of `dir` (at `prefix` in the layer). `lower_prefix` is where `dir`'s
    /// content comes from in the overlay's lower (its own path unless an ancestor was
    /// renamed). With `materialize` (`dir` is, or is inside, a directory the kernel renamed
    /// under `redirect_dir=on`, written as opaque) the lower's entries the upper does not
    /// shadow are written too: a layer has no redirects, so a renamed directory is carried
    /// whole, as containerd's walking differ would write it.
    fn walk(
        &mut self,
        dir: &OwnedFd,
        prefix: &[u8],
        format: UpperFormat,
        lower_prefix: &[u8],
        materialize: bool,
    ) -> anyhow::Result<()> {
        let overlay = format == UpperFormat::Overlay;
        let names = list_dir(dir)?;
        for name in &names {
            if !overlay && name.starts_with(UPPER_TEMP_PREFIX) {
                continue;
            }
            self.entry(dir, name, prefix, format, lower_prefix, materialize)?;
        }
        if materialize {
            let Some(lower) = self.lower.as_mut() else {
                bail!(
                    "{} was renamed in the overlay but the commit has no lower to read it from",
                    String::from_utf8_lossy(prefix)
                );
            };
            let Some(ldir) = lower.open(lower_prefix)? else {
                return Ok(());
            };
            for name in list_dir(&ldir)? {
                if names.binary_search(&name).is_ok() {
                    // Shadowed by the upper: its entry, a whiteout or an opaque directory.
                    continue;
                }
                // The lower is a merged lazysnap mount: no markers, nothing to translate.
                self.entry(&ldir, &name, prefix, UpperFormat::OciDir, b"", false)?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        prefix: &[u8],
        format: UpperFormat,
        lower_prefix: &[u8],
        materialize: bool,
    ) -> anyhow::Result<()> {
        let overlay = format == UpperFormat::Overlay;
        let builder = &mut self.builder;
        let cname = CString::new(name).context("file name with NUL")?;
        let st = fstatat(dir.as_raw_fd(), &cname)?;
        let mut path = prefix.to_vec();
        path.extend_from_slice(name);
        let mut xattrs = xattrs_at(dir.as_raw_fd(), name)?;
        let EntryMeta {
            fmt,
            mut uid,
            mut gid,
            perm,
            rdev,
        } = entry_meta(&st, &mut xattrs);
        let mut opaque = false;
        let mut redirect = None;
        if overlay {
            let whiteout = (fmt == libc::S_IFCHR && rdev == (0, 0))
                || (fmt == libc::S_IFREG && overlay_xattr(&xattrs, "whiteout").is_some());
            if whiteout {
                if !materialize {
                    // (In a materialized directory the lower entry is simply not written.)
                    let mut wh = prefix.to_vec();
                    wh.extend_from_slice(b".wh.");
                    wh.extend_from_slice(name);
                    append_marker(builder, &wh, st.st_mtime)?;
                }
                return Ok(());
            }
            if fmt == libc::S_IFDIR {
                opaque = overlay_xattr(&xattrs, "opaque") == Some(b"y");
                redirect = overlay_xattr(&xattrs, "redirect").map(<[u8]>::to_vec);
            }
            xattrs.retain(|(k, _)| !is_overlay_xattr(k));
        } else if name.starts_with(b".wh.") {
            // A marker: who made it on the host says nothing about the image.
            (uid, gid) = (0, 0);
        }

        let mut header = tar::Header::new_gnu();
        header.set_uid(u64::from(uid));
        header.set_gid(u64::from(gid));
        header.set_mode(perm);
        header.set_mtime(st.st_mtime.max(0) as u64);
        header.set_size(0);
        let pax = pax_records(&st, &xattrs, uid, gid);
        let key = (st.st_dev, st.st_ino);
        if fmt != libc::S_IFDIR && st.st_nlink > 1 {
            if let Some(first) = self.links.get(&key) {
                builder
                    .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
                header.set_entry_type(tar::EntryType::Link);
                builder.append_link(
                    &mut header,
                    OsStr::from_bytes(&path),
                    OsStr::from_bytes(first),
                )?;
                return Ok(());
            }
            self.links.insert(key, path.clone());
        }
        builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        match fmt {
            libc::S_IFDIR => {
                header.set_entry_type(tar::EntryType::Directory);
                let mut p = path.clone();
                p.push(b'/');
                builder.append_data(&mut header, OsStr::from_bytes(&p), io::empty())?;
                // Where this directory's lower content is, and whether it is written out.
                let (child_lower, child_materialize) = match &redirect {
                    Some(r) => (resolve_redirect(r, lower_prefix), true),
                    None => ([lower_prefix, name, b"/"].concat(), materialize && !opaque),
                };
                if opaque || redirect.is_some() {
                    p.extend_from_slice(b".wh..wh..opq");
                    append_marker(builder, &p, st.st_mtime)?;
                }
                let sub = open_dir_nofollow(dir.as_raw_fd(), &cname)?;
                self.walk(
                    &sub,
                    &[path.as_slice(), b"/"].concat(),
                    format,
                    &child_lower,
                    child_materialize,
                )?;
            }
            libc::S_IFREG => {
                // SAFETY: plain syscall; the fd is owned on success.
                let fd = unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("opening {}", String::from_utf8_lossy(&path)));
                }
                // SAFETY: fresh fd we own.
                let file = unsafe { File::from_raw_fd(fd) };
                let size = file.metadata()?.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                builder.append_data(
                    &mut header,
                    OsStr::from_bytes(&path),
                    io::Read::take(file, size),
                )?;
            }
            libc::S_IFLNK => {
                let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
                // SAFETY: readlinkat writes at most buf.len() bytes.
                let n = unsafe {
                    libc::readlinkat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error().into());
                }
                buf.truncate(n as usize);
                header.set_entry_type(tar::EntryType::Symlink);
                builder.append_link(
                    &mut header,
                    OsStr::from_bytes(&path),
                    OsStr::from_bytes(&buf),
                )?;
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                header.set_entry_type(match fmt {
                    libc::S_IFCHR => tar::EntryType::Char,
                    libc::S_IFBLK => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                header.set_device_major(rdev.0)?;
                header.set_device_minor(rdev.1)?;
                builder.append_data(&mut header, OsStr::from_bytes(&path), io::empty())?;
            }
            libc::S_IFSOCK => {
                // Sockets cannot be carried by tar; containerd skips them too.
            }
            _ => bail!(
                "unsupported file type in upper: {}",
                String::from_utf8_lossy(&path)
            ),
        }
        Ok(())
    }
}
