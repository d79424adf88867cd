//! A deliberately naive model of `tar -x` applying layers one after the other (whiteouts and
//! opaque markers included), over a flat map of paths. It reads everything eagerly, so it is for
//! tests: the merged view must show exactly what this produces.

use std::collections::BTreeMap;

use crate::layer::Xattrs;
use crate::layer::{DirEntry, LayerTree, NodeAttr, NodeId, NodeKind};

/// One path of the applied tree.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The layer (index in the stack) and node the metadata came from.
    pub layer: usize,
    pub node: NodeId,
    /// The metadata, nlink as a real filesystem would count it after extraction.
    pub attr: NodeAttr,
    pub xattrs: Xattrs,
}

/// Path (components joined by `/`, root = empty) to what is there after applying `layers`
/// (bottom first).
pub fn apply_layers<L: AsRef<dyn LayerTree>>(layers: &[L]) -> BTreeMap<Vec<u8>, Applied> {
    let mut map = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        let layer = layer.as_ref();
        let root = layer.root();
        if !map.contains_key(&Vec::new()) || !layer.is_implicit(root) {
            map.insert(Vec::new(), applied(layer, i, root));
        }
        apply_dir(&mut map, layer, i, root, &[]);
    }
    // nlink as a filesystem counts it.
    let subdirs: BTreeMap<Vec<u8>, u32> = map
        .iter()
        .filter(|(p, a)| !p.is_empty() && a.attr.kind == NodeKind::Dir)
        .fold(BTreeMap::new(), |mut acc, (p, _)| {
            *acc.entry(parent_of(p)).or_insert(0) += 1;
            acc
        });
    let mut links: BTreeMap<(usize, NodeId), u32> = BTreeMap::new();
    for a in map.values() {
        if a.attr.kind != NodeKind::Dir {
            *links.entry((a.layer, a.node)).or_insert(0) += 1;
        }
    }
    for (p, a) in map.iter_mut() {
        a.attr.nlink = if a.attr.kind == NodeKind::Dir {
            2 + subdirs.get(p).copied().unwrap_or(0)
        } else if a.attr.nlink > 1 {
            links.get(&(a.layer, a.node)).copied().unwrap_or(1)
        } else {
            1
        };
    }
    map
}

fn applied(layer: &dyn LayerTree, i: usize, node: NodeId) -> Applied {
    Applied {
        layer: i,
        node,
        attr: layer.attr(node),
        xattrs: layer.xattrs(node),
    }
}

fn parent_of(p: &[u8]) -> Vec<u8> {
    match p.iter().rposition(|c| *c == b'/') {
        Some(i) => p[..i].to_vec(),
        None => Vec::new(),
    }
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = prefix.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Removes everything strictly below `p`.
fn remove_below(map: &mut BTreeMap<Vec<u8>, Applied>, p: &[u8]) {
    let below: Vec<Vec<u8>> = map
        .keys()
        .filter(|k| k.len() > p.len() && k.starts_with(p) && (p.is_empty() || k[p.len()] == b'/'))
        .cloned()
        .collect();
    for k in below {
        map.remove(&k);
    }
}

fn apply_dir(
    map: &mut BTreeMap<Vec<u8>, Applied>,
    layer: &dyn LayerTree,
    i: usize,
    dir: NodeId,
    prefix: &[u8],
) {
    if layer.is_opaque(dir) {
        remove_below(map, prefix);
    }
    let mut entries = Vec::new();
    layer.for_each_child(dir, &mut |name, e| entries.push((name.to_vec(), e)));
    for (name, entry) in entries {
        let p = join(prefix, &name);
        match entry {
            DirEntry::Whiteout => {
                remove_below(map, &p);
                map.remove(&p);
            }
            DirEntry::Node(n) => {
                let kind = layer.attr(n).kind;
                let existing_dir = map.get(&p).is_some_and(|a| a.attr.kind == NodeKind::Dir);
                if kind == NodeKind::Dir && existing_dir {
                    if !layer.is_implicit(n) {
                        map.insert(p.clone(), applied(layer, i, n));
                    }
                } else {
                    remove_below(map, &p);
                    map.insert(p.clone(), applied(layer, i, n));
                }
                if kind == NodeKind::Dir {
                    apply_dir(map, layer, i, n, &p);
                }
            }
        }
    }
}
