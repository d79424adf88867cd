#!/usr/bin/env bash
# Installs everything lazysnap, its tests and its sample need on a fresh Debian 12 machine.
# Idempotent: a second run only checks. Used by the README and by .ci/run.
set -euo pipefail

PACKAGES=(
  fuse3            # fusermount3, for unprivileged mounts
  uidmap           # newuidmap/newgidmap: user namespaces with subordinate ids (rootless tests)
  umoci            # reference unpacker the equality tests compare against
  skopeo           # copies images between layouts, archives and registries
  docker-registry  # distribution 2.8: the local registry of tests/registry.rs (scripts/registry-env.sh)
  apache2-utils    # htpasswd, for the registry's Basic auth
  openssl          # a CA and certificate for the HTTPS registry test
  zstd pigz gzip   # peers: pure decompression, layer compression for test images
  tar xz-utils
  attr             # getfattr/setfattr for xattr checks
  python3          # scripts/mkimage.py, make-edge-images.py, ocitool.py (test images, references)
  protobuf-compiler  # protoc, for containerd's gRPC protos
  containerd runc  # scripts/containerd-env.sh: a private containerd on lazysnap (tests/containerd.rs)
  golang-go        # containerd's conformance suite (tests/conformance, Go 1.19, GOPATH mode)
  golang-github-containerd-containerd-dev  # containerd 1.6 source: snapshots/testsuite, proxy client (pulls grpc & co.)
  golang-github-containerd-stargz-snapshotter-dev  # the estargz Go library: eStargz test images (scripts/make-estargz-images.py)
  stargz-snapshotter  # ctr-remote (Debian ships only that): the eStargz peer tool
  ca-certificates
  gcc zlib1g-dev   # soci-snapshotter's zTOC code is cgo over zlib (scripts/install-peers.sh)
  # erofs-utils 1.8 (mkfs.erofs --tar, for containerd 2.x's erofs differ) built from source
  # by scripts/install-peers.sh: Debian 12's erofs-utils 1.5 has no --tar
  make autoconf automake libtool pkg-config curl
  liblz4-dev liblzma-dev libzstd-dev uuid-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# Ordinary users mount through fusermount3, which opens /dev/fuse with the caller's rights:
# Debian's udev rule makes it 0666. Where udev does not run (containers, minimal VMs) the kernel
# leaves it 0600; give it the mode udev would.
if [[ -c /dev/fuse && $(stat -c %a /dev/fuse) != 666 ]]; then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO chmod 0666 /dev/fuse
fi

# containerd 2.x (tests/containerd2*.rs, the peers benchmark): built from its Go module with the
# Go on PATH (Debian 12's containerd is 1.6). Idempotent: a no-op when it is installed.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/install-containerd2.sh" >/dev/null
# nerdctl, the CNI plugins, crictl (tests/containerd2.rs, tests/cri.rs), stargz-snapshotter and
# soci-snapshotter (the peers of scripts/bench-containerd.py), from their Go modules; erofs-utils
# (containerd's erofs snapshotter, the bench's erofs row) from Debian's source tarball.
bash "$here/install-peers.sh" >/dev/null
