//! Arbitrary bytes as an uncompressed layer: the tar reader and index builder, then every node
//! through the layer tree (and the bytes as an index file).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lazysnap_fuzz::tar_index(data);
});
