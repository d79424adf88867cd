//! The crate's layering, checked: a module names only modules of lower layers (ARCHITECTURE.md).
//! The overlay rules (`merge`, with its `write` half and its fd cache) sit above the upper
//! directory's on-disk form (`upper`) and the host syscalls (`host`), which know nothing of
//! merging; FUSE (`fs`, `mount`) sits above the rules.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Layers from the bottom; a module may use only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["error", "layer", "host"],
    &["ownership", "owners", "mem", "reference"],
    &["upper"],
    &["merge"],
    &["fs"],
    &["mount"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("listing fuse/src") {
        let p = e.expect("listing fuse/src").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a file's code (not its comments) names as `crate::NAME`.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found only {files:?}");
    let mut wrong = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let module = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a module name");
        if module == "lib" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            wrong.push(format!(
                "{}: module `{module}` is in no layer",
                rel.display()
            ));
            continue;
        };
        let text = fs::read_to_string(f).expect("reading a source file");
        for used in uses(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                _ => wrong.push(format!(
                    "{}: `{module}` uses `crate::{used}`, which is not below it",
                    rel.display()
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_a_use_and_ignores_comments() {
    let found =
        uses("use crate::merge::Ino;\n// crate::fs in a comment\nlet x = crate::host::f();");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["host".to_string(), "merge".to_string()]
    );
}
