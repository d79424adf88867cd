//! Arbitrary bytes as a Gzip layer blob: indexing pass (checkpoints / frame map, local copy),
//! then random reads through a `BlobReader` checked against the pass's output.
#![no_main]

use lazysnap::blob::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lazysnap_fuzz::random_access(Compression::Gzip, data);
});
