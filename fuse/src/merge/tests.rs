//! The overlay rules, checked on in-memory layers without FUSE, by hand-written cases and by a
//! randomized comparison with the naive `tar -x` model of [`crate::reference`].

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::layer::LayerTree;
use crate::mem::{MemLayer, MemLayerBuilder};
use crate::reference::apply_layers;

fn merged(layers: Vec<MemLayer>) -> Merged {
    Merged::new(stack(layers))
}

fn stack(layers: Vec<MemLayer>) -> LayerStack {
    layers
        .into_iter()
        .map(|l| Arc::new(l) as Arc<dyn LayerTree>)
        .collect()
}

fn layer(f: impl FnOnce(&mut MemLayerBuilder)) -> MemLayer {
    let mut b = MemLayer::builder();
    f(&mut b);
    b.build()
}

/// Resolves a `/`-separated path in the merged view.
fn resolve(m: &Merged, path: &str) -> Option<Ino> {
    let mut cur = ROOT_INO;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        cur = m.child(cur, c.as_bytes())?;
    }
    Some(cur)
}

fn attr(m: &Merged, path: &str) -> NodeAttr {
    let ino = resolve(m, path).unwrap_or_else(|| panic!("{path} missing"));
    m.attr(ino).expect("attr")
}

fn names(m: &Merged, path: &str) -> Vec<String> {
    let ino = resolve(m, path).expect("dir");
    m.dir(ino)
        .expect("is a dir")
        .children()
        .iter()
        .map(|c| String::from_utf8_lossy(&c.name).into_owned())
        .collect()
}

fn read_all(m: &Merged, path: &str) -> Vec<u8> {
    let ino = resolve(m, path).expect("file");
    let (layer, node, size) = m.file_source(ino).expect("a file");
    let mut buf = vec![0u8; size as usize];
    let n = layer.read_at(node, 0, &mut buf).expect("read");
    buf.truncate(n);
    buf
}

/// Every path of the merged view with its inode and attributes.
fn walk(m: &Merged) -> BTreeMap<Vec<u8>, (Ino, NodeAttr)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![(Vec::new(), ROOT_INO)];
    while let Some((path, ino)) = todo.pop() {
        let a = m.attr(ino).expect("attr");
        if a.kind == NodeKind::Dir {
            for c in m.dir(ino).expect("dir").children() {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&c.name);
                todo.push((p, c.ino));
            }
        }
        out.insert(path, (ino, a));
    }
    out
}

/// The merged view must equal applying the layers with `tar -x`: same paths, metadata, nlink,
/// xattrs, content, and one inode per layer node.
fn check_reference(layers: &[MemLayer]) {
    let st = stack(layers.to_vec());
    let m = Merged::new(st.clone());
    let got = walk(&m);
    check_found_again(&st, &got);
    let want = apply_layers(&st);
    let got_paths: Vec<_> = got.keys().map(|p| String::from_utf8_lossy(p)).collect();
    let want_paths: Vec<_> = want.keys().map(|p| String::from_utf8_lossy(p)).collect();
    assert_eq!(got_paths, want_paths, "paths");
    let mut ino_of: BTreeMap<(usize, NodeId), Ino> = BTreeMap::new();
    for (p, w) in &want {
        let (ino, a) = &got[p];
        let ps = String::from_utf8_lossy(p);
        assert_eq!(a, &w.attr, "attributes of /{ps}");
        assert_eq!(m.xattrs(*ino).expect("xattrs"), w.xattrs, "xattrs of /{ps}");
        if w.attr.kind == NodeKind::File {
            let l = &st[w.layer];
            let mut buf = vec![0u8; w.attr.size as usize];
            let n = l.read_at(w.node, 0, &mut buf).expect("read");
            assert_eq!(read_all(&m, &ps), buf[..n].to_vec(), "content of /{ps}");
        }
        if w.attr.kind != NodeKind::Dir {
            // Same layer node <=> same inode.
            let prev = ino_of.insert((w.layer, w.node), *ino);
            assert!(
                prev.is_none() || prev == Some(*ino),
                "hardlink inode of /{ps}"
            );
        }
    }
    let distinct: std::collections::BTreeSet<Ino> = ino_of.values().copied().collect();
    assert_eq!(
        distinct.len(),
        ino_of.len(),
        "distinct nodes share an inode"
    );
}

/// A second view over the same stack (a daemon started again after a crash) answers every
/// number the first handed out, deepest paths first, with the same entry.
fn check_found_again(st: &LayerStack, got: &BTreeMap<Vec<u8>, (Ino, NodeAttr)>) {
    let again = Merged::new(st.clone());
    for (p, (ino, a)) in got.iter().rev() {
        let ps = String::from_utf8_lossy(p);
        assert_eq!(
            again.attr(*ino).as_ref(),
            Some(a),
            "/{ps} (ino {ino}) found again"
        );
    }
    for (p, (ino, a)) in got {
        if a.kind == NodeKind::Dir {
            let list = |m: &Merged| -> Vec<(Vec<u8>, Ino)> {
                let d = m.dir(*ino).expect("a dir");
                d.children()
                    .iter()
                    .map(|c| (c.name.to_vec(), c.ino))
                    .collect()
            };
            let first = Merged::new(st.clone());
            let _ = walk(&first);
            assert_eq!(
                list(&again),
                list(&first),
                "children of /{}",
                String::from_utf8_lossy(p)
            );
        }
    }
    assert_eq!(again.inode(UPPER_INO_BASE + 1).map(|i| i.ino), None);
    assert_eq!(
        again.inode(1 << 40).map(|i| i.ino),
        None,
        "a number never handed out"
    );
}

#[test]
fn whiteout_file() {
    let l0 = layer(|b| {
        b.file("a", 0o644, b"a");
        b.file("b", 0o644, b"b");
    });
    let l1 = layer(|b| {
        b.whiteout("a");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(names(&m, ""), ["b"]);
    assert!(resolve(&m, "a").is_none());
    check_reference(&[l0, l1]);
}

#[test]
fn whiteout_dir_and_readd() {
    let l0 = layer(|b| {
        b.dir("d", 0o700).owner(7, 7);
        b.file("d/x", 0o644, b"x");
        b.file("d/y/z", 0o644, b"z");
    });
    let l1 = layer(|b| {
        b.whiteout("d");
    });
    let l2 = layer(|b| {
        b.file("d/new", 0o600, b"new");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert!(resolve(&m, "d").is_none());
    assert!(names(&m, "").is_empty());

    let m = merged(vec![l0.clone(), l1.clone(), l2.clone()]);
    assert_eq!(names(&m, "d"), ["new"]);
    // Recreated fresh: the whited-out directory's metadata does not come back.
    let d = attr(&m, "d");
    assert_eq!((d.perm, d.uid), (0o755, 0));
    check_reference(&[l0, l1, l2]);
}

#[test]
fn whiteout_of_absent_name() {
    let l0 = layer(|b| {
        b.file("a", 0o644, b"a");
    });
    let l1 = layer(|b| {
        b.whiteout("ghost");
        b.whiteout("nodir/ghost");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(names(&m, ""), ["a", "nodir"]);
    assert!(names(&m, "nodir").is_empty());
    check_reference(&[l0, l1]);
}

#[test]
fn whiteout_then_readd_higher() {
    let l0 = layer(|b| {
        b.file("f", 0o644, b"old");
    });
    let l1 = layer(|b| {
        b.whiteout("f");
    });
    let l2 = layer(|b| {
        b.file("f", 0o640, b"new content");
    });
    let m = merged(vec![l0.clone(), l1.clone(), l2.clone()]);
    assert_eq!(read_all(&m, "f"), b"new content");
    assert_eq!(attr(&m, "f").perm, 0o640);
    check_reference(&[l0, l1, l2]);
}

#[test]
fn opaque_dir_hides_below_and_readds() {
    let l0 = layer(|b| {
        b.dir("d", 0o710).owner(3, 4);
        b.file("d/a", 0o644, b"old a");
        b.file("d/b", 0o644, b"b");
        b.file("d/sub/c", 0o644, b"c");
    });
    let l1 = layer(|b| {
        b.opaque("d");
        b.file("d/a", 0o600, b"new a");
        b.file("d/sub/e", 0o644, b"e");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(names(&m, "d"), ["a", "sub"]);
    assert_eq!(read_all(&m, "d/a"), b"new a");
    // The opaque directory's own children show, not the lower `sub`'s.
    assert_eq!(names(&m, "d/sub"), ["e"]);
    // `d` was only implied in l1: it keeps l0's metadata (tar -x does not recreate it).
    let d = attr(&m, "d");
    assert_eq!((d.perm, d.uid, d.gid), (0o710, 3, 4));
    check_reference(&[l0, l1]);
}

#[test]
fn opaque_explicit_dir_takes_its_own_attrs() {
    let l0 = layer(|b| {
        b.dir("d", 0o700);
        b.file("d/a", 0o644, b"a");
    });
    let l1 = layer(|b| {
        b.dir("d", 0o755).owner(1, 1);
        b.opaque("d");
    });
    let l2 = layer(|b| {
        b.file("d/z", 0o644, b"z");
    });
    let m = merged(vec![l0.clone(), l1.clone(), l2.clone()]);
    assert_eq!(names(&m, "d"), ["z"]);
    assert_eq!(attr(&m, "d").uid, 1);
    check_reference(&[l0, l1, l2]);
}

#[test]
fn opaque_root() {
    let l0 = layer(|b| {
        b.file("a", 0o644, b"a");
    });
    let l1 = layer(|b| {
        b.opaque("");
        b.file("b", 0o644, b"b");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(names(&m, ""), ["b"]);
    check_reference(&[l0, l1]);
}

#[test]
fn file_replaced_by_dir_starts_fresh() {
    let l0 = layer(|b| {
        b.file("x", 0o600, b"file").owner(9, 9);
        b.dir("keep", 0o700);
    });
    let l1 = layer(|b| {
        b.file("x/y", 0o644, b"y");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    let x = attr(&m, "x");
    assert_eq!((x.kind, x.perm, x.uid), (NodeKind::Dir, 0o755, 0));
    assert_eq!(names(&m, "x"), ["y"]);
    check_reference(&[l0, l1]);
}

#[test]
fn dir_replaced_by_file_with_subtree() {
    let l0 = layer(|b| {
        b.file("d/a", 0o644, b"a");
        b.file("d/e/f", 0o644, b"f");
        b.symlink("d/e/l", "../a");
    });
    let l1 = layer(|b| {
        b.file("d", 0o644, b"now a file");
    });
    let l2 = layer(|b| {
        b.file("other", 0o644, b"o");
    });
    let m = merged(vec![l0.clone(), l1.clone(), l2.clone()]);
    assert_eq!(attr(&m, "d").kind, NodeKind::File);
    assert!(resolve(&m, "d/a").is_none());
    assert!(m.dir(resolve(&m, "d").expect("d")).is_none());
    assert_eq!(read_all(&m, "d"), b"now a file");
    check_reference(&[l0, l1, l2]);
}

#[test]
fn dir_over_dir_merges_attrs_from_topmost_explicit() {
    let l0 = layer(|b| {
        b.dir("d", 0o700).owner(5, 6).mtime(1000, 1);
        b.file("d/a", 0o644, b"a");
    });
    let l1 = layer(|b| {
        b.file("d/b", 0o644, b"b"); // d implied
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(names(&m, "d"), ["a", "b"]);
    let d = attr(&m, "d");
    assert_eq!(
        (d.perm, d.uid, d.gid, d.mtime.sec, d.mtime.nsec),
        (0o700, 5, 6, 1000, 1)
    );

    let l2 = layer(|b| {
        b.dir("d", 0o750).owner(8, 8);
    });
    let m = merged(vec![l0.clone(), l1.clone(), l2.clone()]);
    let d = attr(&m, "d");
    assert_eq!((d.perm, d.uid), (0o750, 8));
    assert_eq!(names(&m, "d"), ["a", "b"]);
    check_reference(&[l0, l1, l2]);
}

#[test]
fn implicit_dir_xattrs_come_from_below() {
    let l0 = layer(|b| {
        b.dir("d", 0o755).xattr(b"user.k", b"v0");
    });
    let l1 = layer(|b| {
        b.file("d/f", 0o644, b"");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    let ino = resolve(&m, "d").expect("d");
    assert_eq!(
        m.xattrs(ino).expect("xattrs"),
        vec![(b"user.k".to_vec(), b"v0".to_vec())]
    );
    check_reference(&[l0, l1]);
}

#[test]
fn hardlinks_share_inode_and_count_visible_links() {
    let l0 = layer(|b| {
        b.file("a", 0o644, b"shared");
        b.hardlink("h1", "a");
        b.hardlink("sub/h2", "a");
    });
    let m = merged(vec![l0.clone()]);
    let a = resolve(&m, "a");
    assert_eq!(a, resolve(&m, "h1"));
    assert_eq!(a, resolve(&m, "sub/h2"));
    assert_eq!(attr(&m, "a").nlink, 3);

    // One link whited out, one replaced: only `a` is left.
    let l1 = layer(|b| {
        b.whiteout("h1");
        b.file("sub/h2", 0o644, b"other");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(attr(&m, "a").nlink, 1);
    assert_ne!(resolve(&m, "a"), resolve(&m, "sub/h2"));
    check_reference(&[l0.clone(), l1]);

    // The directory holding a link hidden by an opaque dir above.
    let l1 = layer(|b| {
        b.opaque("sub");
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(attr(&m, "h1").nlink, 2);
    check_reference(&[l0, l1]);
}

#[test]
fn dir_nlink_counts_subdirs() {
    let l0 = layer(|b| {
        b.dir("a", 0o755);
        b.dir("b/c", 0o755);
        b.file("f", 0o644, b"");
    });
    let l1 = layer(|b| {
        b.whiteout("a");
        b.dir("d", 0o755);
    });
    let m = merged(vec![l0.clone(), l1.clone()]);
    assert_eq!(attr(&m, "").nlink, 4); // b, d
    assert_eq!(attr(&m, "b").nlink, 3);
    assert_eq!(attr(&m, "f").nlink, 1);
    check_reference(&[l0, l1]);
}

#[test]
fn special_files_and_symlinks() {
    let l0 = layer(|b| {
        b.symlink("l", "target/x");
        b.special("dev/null", NodeKind::CharDev, 0o666, libc::makedev(1, 3));
        b.special("dev/sda", NodeKind::BlockDev, 0o660, libc::makedev(8, 0));
        b.special("fifo", NodeKind::Fifo, 0o644, 0);
        b.file("suid", 0o4755, b"#!").mtime(-5, 7);
    });
    let m = merged(vec![l0.clone()]);
    let l = resolve(&m, "l").expect("l");
    assert_eq!(m.readlink(l).expect("readlink"), b"target/x");
    assert_eq!(attr(&m, "dev/null").rdev, libc::makedev(1, 3));
    assert_eq!(attr(&m, "suid").perm, 0o4755);
    assert_eq!(attr(&m, "suid").mtime.sec, -5);
    check_reference(&[l0]);
}

#[test]
fn inodes_are_stable_and_lazy() {
    let l0 = layer(|b| {
        for i in 0..100 {
            b.file(&format!("d{}/f{i}", i % 10), 0o644, b"x");
        }
    });
    let m = merged(vec![l0]);
    assert_eq!(m.inode_count(), 1, "nothing merged before the first lookup");
    let (d3, _) = m.lookup(ROOT_INO, b"d3").expect("d3");
    let (f, _) = m.lookup(d3, b"f13").expect("f13");
    // Only the root and d3 were merged: root's 10 dirs + d3's 10 files.
    assert_eq!(m.inode_count(), 21);
    m.forget(f, 1);
    m.forget(d3, 1);
    assert_eq!(m.lookup(ROOT_INO, b"d3").expect("d3").0, d3);
    assert_eq!(m.lookup(d3, b"f13").expect("f13").0, f);
    assert_eq!(m.lookup(d3, b"..").expect("..").0, ROOT_INO);
    assert!(matches!(m.lookup(d3, b"nope"), Err(Errno::NoEntry)));
    assert!(matches!(m.lookup(f, b"x"), Err(Errno::NotDir)));
}

#[test]
fn empty_stack_is_an_empty_root() {
    let m = Merged::new(Vec::new());
    assert!(m.dir(ROOT_INO).expect("root").children().is_empty());
    assert_eq!(m.attr(ROOT_INO).expect("root").kind, NodeKind::Dir);
}

/// A small deterministic generator (no dependency needed for this).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_path(r: &mut Rng) -> String {
    const NAMES: [&str; 4] = ["a", "b", "c", "d"];
    let depth = 1 + r.below(3);
    (0..depth)
        .map(|_| NAMES[r.below(4) as usize])
        .collect::<Vec<_>>()
        .join("/")
}

fn random_layer(r: &mut Rng) -> MemLayer {
    let mut b = MemLayer::builder();
    let mut files: Vec<String> = Vec::new();
    for _ in 0..(1 + r.below(12)) {
        let p = random_path(r);
        let t = (r.below(1000) as i64, r.below(1_000_000_000) as u32);
        match r.below(9) {
            0 | 1 => {
                let data = format!("{p} {}", r.next());
                b.file(&p, 0o644, data.as_bytes())
                    .owner(r.below(3) as u32, 0)
                    .mtime(t.0, t.1);
                files.push(p);
            }
            2 => {
                b.dir(&p, 0o700 + r.below(0o100) as u32).mtime(t.0, t.1);
            }
            3 => {
                b.symlink(&p, "somewhere");
            }
            4 => {
                // Only link to a file still at its path in this layer.
                let live: Vec<&String> = files
                    .iter()
                    .filter(|f| {
                        let l = b.build();
                        l.resolve(f)
                            .is_some_and(|n| l.attr(n).kind == NodeKind::File)
                    })
                    .collect();
                if let Some(f) = live.get(r.below(live.len().max(1) as u64) as usize) {
                    let f = (*f).clone();
                    if !p.starts_with(&f) {
                        b.hardlink(&p, &f);
                    }
                }
            }
            5 | 6 => {
                b.whiteout(&p);
            }
            7 => {
                b.opaque(&p);
            }
            _ => {
                b.dir(&p, 0o755).xattr(b"user.x", &r.next().to_le_bytes());
            }
        }
    }
    b.build()
}

#[test]
fn random_stacks_match_tar_x() {
    for seed in 1..400u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let n = 1 + r.below(4);
        let layers: Vec<MemLayer> = (0..n).map(|_| random_layer(&mut r)).collect();
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_reference(&layers)));
        if let Err(e) = result {
            eprintln!("seed {seed} failed");
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn describe_names_layer_and_path() {
    let l0 = layer(|b| {
        b.file("usr/lib/libz.so", 0o644, b"z");
    });
    let l1 = layer(|b| {
        b.file("usr/bin/x", 0o755, b"x");
    });
    let m = merged(vec![l0, l1]);
    let x = resolve(&m, "usr/bin/x").expect("x");
    assert!(
        m.describe(x).ends_with("(layer 1 node 3: /usr/bin/x)"),
        "{}",
        m.describe(x)
    );
    let z = resolve(&m, "usr/lib/libz.so").expect("z");
    assert!(m.describe(z).contains("layer 0"), "{}", m.describe(z));
    assert!(
        m.describe(z).ends_with("/usr/lib/libz.so)"),
        "{}",
        m.describe(z)
    );
}
