//! Changes through a merged view whose fd cache holds a single fd, so that nearly every access
//! opens its upper entry again from the parent chain: deep paths, renamed directories, copy-up,
//! a hardlink whose recorded name is removed and a file unlinked while open all still resolve.

use std::io::Write;
use std::sync::Arc;

use crate::layer::{LayerStack, LayerTree, NodeKind};
use crate::mem::MemLayer;
use crate::merge::write::{NewNode, SetAttr};
use crate::merge::{Ino, Merged, ROOT_INO};
use crate::owners::Caller;
use crate::upper::Upper;

const ME: Caller = Caller { uid: 0, gid: 0 };

fn view(upper: &std::path::Path) -> Merged {
    let mut b = MemLayer::builder();
    b.file("a/b/c/file", 0o644, b"lower");
    b.file("a/b/other", 0o600, b"o");
    let stack: LayerStack = vec![Arc::new(b.build()) as Arc<dyn LayerTree>];
    Merged::with_upper_and_fds(stack, Upper::open(upper, true).expect("upper"), 1)
}

/// Makes the cache hold the fd of `/zz` only (created on first use).
fn evict(m: &Merged) {
    let zz = match m.lookup(ROOT_INO, b"zz") {
        Ok((ino, _)) => ino,
        Err(_) => m
            .create(ME, ROOT_INO, b"zz", NewNode::Dir { perm: 0o755 })
            .expect("mkdir zz"),
    };
    m.attr_full(zz).expect("attr of zz");
}

fn at(m: &Merged, path: &str) -> Ino {
    path.split('/').fold(ROOT_INO, |cur, c| {
        m.lookup(cur, c.as_bytes())
            .unwrap_or_else(|e| panic!("{path}: {e:?}"))
            .0
    })
}

fn size(m: &Merged, ino: Ino) -> u64 {
    m.attr_full(ino).expect("attr").0.size
}

fn append(m: &Merged, ino: Ino, data: &[u8]) {
    let mut f = m
        .open_upper(ino, libc::O_WRONLY | libc::O_APPEND)
        .expect("open for writing");
    // The kernel gives offsets; here the file's end is the offset.
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::End(0)).expect("seek");
    f.write_all(data).expect("write");
}

#[test]
fn entries_resolve_again_from_their_parents_when_their_fd_was_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = view(tmp.path());

    // Deep new tree, then its top renamed: everything below is reached through the new name.
    let mut dir = ROOT_INO;
    for name in ["n1", "n2", "n3"] {
        dir = m
            .create(ME, dir, name.as_bytes(), NewNode::Dir { perm: 0o755 })
            .expect("mkdir");
    }
    let f = m
        .create(ME, dir, b"f", NewNode::File { perm: 0o644 })
        .expect("create");
    append(&m, f, b"12345");
    m.rename(ROOT_INO, b"n1", ROOT_INO, b"m1", 0)
        .expect("rename");
    assert_eq!(size(&m, at(&m, "m1/n2/n3/f")), 5);
    assert_eq!(size(&m, f), 5);

    // Copy-up of a lower file three levels down, then a chmod through a fresh reopen.
    let lower = at(&m, "a/b/c/file");
    append(&m, lower, b"+");
    evict(&m);
    m.setattr(
        lower,
        &SetAttr {
            perm: Some(0o640),
            ..SetAttr::default()
        },
        None,
    )
    .expect("chmod");
    let a = m.attr_full(lower).expect("attr").0;
    assert_eq!((a.size, a.perm & 0o777), (6, 0o640));

    // A hardlink whose recorded name goes: the other name still leads to it.
    m.link(f, ROOT_INO, b"g").expect("link");
    m.unlink(dir, b"f").expect("unlink");
    evict(&m);
    assert_eq!(size(&m, f), 5, "through the pinned fd");
    assert_eq!(at(&m, "g"), f);
    evict(&m);
    assert_eq!(size(&m, f), 5, "through the name g");

    // A file unlinked while open keeps answering getattr.
    let h = m.open_upper(f, libc::O_RDONLY).expect("open for reading");
    m.unlink(ROOT_INO, b"g").expect("unlink");
    evict(&m);
    assert_eq!(size(&m, f), 5);
    drop(h);

    assert!(m.fds.len() <= 1, "{} fds kept", m.fds.len());
    assert_eq!(
        m.attr(at(&m, "m1/n2/n3")).map(|a| a.kind),
        Some(NodeKind::Dir)
    );
}

#[test]
fn a_symlink_planted_in_the_upper_is_not_followed_on_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = view(tmp.path());
    let n = m
        .create(ME, ROOT_INO, b"n", NewNode::Dir { perm: 0o755 })
        .expect("mkdir");
    let f = m
        .create(ME, n, b"f", NewNode::File { perm: 0o644 })
        .expect("create");
    evict(&m);
    // Someone replaces the upper directory `n` by a symlink to a directory holding an `f`.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    std::fs::write(elsewhere.path().join("f"), b"host file").expect("write");
    std::fs::rename(tmp.path().join("n"), tmp.path().join("moved")).expect("rename");
    std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join("n")).expect("symlink");
    let e = m
        .attr_full(f)
        .expect_err("must not resolve through the symlink");
    assert!(
        matches!(e, crate::merge::Errno::Io(ref io) if io.raw_os_error() == Some(libc::ELOOP) || io.raw_os_error() == Some(libc::ENOTDIR)),
        "{e:?}"
    );
}
