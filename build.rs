//! Generates containerd's gRPC API (snapshots v1, diff v1 and the types they use) from the
//! protos vendored under `proto/` (copied from the `containerd-client` crate's vendor tree,
//! wire-compatible with containerd 1.6). Server and client code, tonic 0.14 / prost 0.14.
//! The google/protobuf well-known types map onto `prost-types`.

const PROTOS: &[&str] = &[
    "proto/github.com/containerd/containerd/api/types/mount.proto",
    "proto/github.com/containerd/containerd/api/types/descriptor.proto",
    "proto/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
    "proto/github.com/containerd/containerd/api/services/diff/v1/diff.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
