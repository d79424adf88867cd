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

/// Every entry a view shows, by path: its number and what identifies it (kind, mode, size,
/// links, mtime; not atime, which reads move).
fn numbers(m: &Merged) -> Vec<(String, Ino, (NodeKind, u32, u64, u32, i64))> {
    let mut out = Vec::new();
    let mut dirs = vec![(String::new(), ROOT_INO)];
    while let Some((path, dir)) = dirs.pop() {
        for c in m.dir(dir).expect("a directory").children() {
            let p = format!("{path}/{}", String::from_utf8_lossy(&c.name));
            let a = m.attr(c.ino).expect("attr");
            out.push((
                p.clone(),
                c.ino,
                (a.kind, a.perm, a.size, a.nlink, a.mtime.sec),
            ));
            if c.kind == NodeKind::Dir {
                dirs.push((p, c.ino));
            }
        }
    }
    out
}

#[test]
fn a_second_view_of_the_upper_answers_every_number_the_first_handed_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = view(tmp.path());
    // Changes of each kind: a copy-up (it keeps its lower number), one copied up and moved to
    // another directory (its lower path now leads nowhere), new entries (numbered by the host),
    // a hardlink, a renamed lower directory (copied up as a tree), a symlink.
    let lower = at(&m, "a/b/c/file");
    append(&m, lower, b"+");
    let other = at(&m, "a/b/other");
    let chmod = SetAttr {
        perm: Some(0o640),
        ..SetAttr::default()
    };
    m.setattr(other, &chmod, None).expect("chmod");
    m.rename(at(&m, "a/b"), b"other", ROOT_INO, b"moved-other", 0)
        .expect("rename");
    let d = m
        .create(ME, ROOT_INO, b"new", NewNode::Dir { perm: 0o755 })
        .expect("mkdir");
    let f = m
        .create(ME, d, b"f", NewNode::File { perm: 0o644 })
        .expect("create");
    append(&m, f, b"new file");
    m.link(f, ROOT_INO, b"f-link").expect("link");
    m.rename(at(&m, "a"), b"b", ROOT_INO, b"b2", 0)
        .expect("rename a lower directory");
    m.create(
        ME,
        d,
        b"s",
        NewNode::Symlink {
            target: b"f".to_vec(),
        },
    )
    .expect("symlink");
    let first = numbers(&m);
    assert!(first
        .iter()
        .any(|(p, ino, _)| p == "/moved-other" && *ino == other));
    assert!(first
        .iter()
        .any(|(p, ino, _)| p == "/b2/c/file" && *ino == lower));

    // A daemon started again over the same layers and upper, asked deepest first.
    let again = view(tmp.path());
    for (p, ino, a) in first.iter().rev() {
        let got = again
            .attr(*ino)
            .map(|a| (a.kind, a.perm, a.size, a.nlink, a.mtime.sec));
        assert_eq!(got.as_ref(), Some(a), "{p} (ino {ino:#x}) found again");
    }
    assert_eq!(
        numbers(&again),
        first,
        "the second view shows the same numbers"
    );
    assert!(again
        .inode(crate::merge::UPPER_INO_BASE | 0xffff_ffff)
        .is_none());
}
