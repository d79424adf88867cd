//! Arbitrary bytes as the JSON documents import reads: index.json (names, platforms), a
//! nested index (platform choice), a manifest and a config (layers, diff_ids, media types),
//! and a `docker save` manifest.json (member paths confined to the archive). The input is
//! split at its first NUL: the part before is the index/manifest, the part after the config.
#![no_main]

use lazysnap::image::resolve::{
    choose_manifest, manifest_layers, parse_config, parse_docker_manifest, parse_index,
    parse_index_json, parse_manifest, platform_of_config,
};
use lazysnap::image::source::{open_source, ImageSource};
use lazysnap::image::Platform;
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// A layout directory with one member, `sub/layer.tar`, and a file beside it.
    static SOURCE: (tempfile::TempDir, Box<dyn ImageSource>) = {
        let dir = lazysnap_fuzz::scratch();
        std::fs::create_dir_all(dir.path().join("layout/sub")).unwrap();
        std::fs::write(dir.path().join("layout/sub/layer.tar"), b"x").unwrap();
        std::fs::write(dir.path().join("outside"), b"secret").unwrap();
        let src = open_source(&dir.path().join("layout")).unwrap();
        (dir, src)
    };
}

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&c| c == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let _ = parse_index_json(a, "fuzz");
    if let Ok(index) = parse_index(a, "fuzz") {
        let _ = choose_manifest(&index, None);
        let arm = Platform::parse("linux/arm64/v8").unwrap();
        let _ = choose_manifest(&index, Some(&arm));
    }
    if let Ok(entries) = parse_docker_manifest(a) {
        SOURCE.with(|(_, src)| {
            for e in entries {
                for path in std::iter::once(&e.config).chain(&e.layers) {
                    let exists = src.exists(path);
                    if let Ok((mut r, _)) = src.open(path) {
                        let mut content = Vec::new();
                        let _ = std::io::Read::read_to_end(&mut r, &mut content);
                        assert!(exists, "opened a member {path:?} that does not exist");
                        assert_eq!(content, b"x", "member {path:?} escaped the source root");
                    }
                }
            }
        });
    }
    let manifest = parse_manifest(a, "fuzz manifest");
    let config = parse_config(if b.is_empty() { a } else { b }, "fuzz config");
    if let Ok(config) = &config {
        let p = platform_of_config(config);
        let _ = Platform::parse(&p.to_string());
    }
    if let (Ok((manifest, _)), Ok(config)) = (manifest, config) {
        let _ = manifest_layers(&manifest, &config, "fuzz manifest");
    }
});
