#!/usr/bin/env bash
# The main job on a built-in sample image, on a fresh Debian machine:
# install what is needed, build lazysnap, build a sample image from real Debian packages
# (libc6, coreutils, bash, python3; three layers, zstd), import it, list and inspect it,
# mount it lazily, and use it (list /, read a file, run programs from it with chroot).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
echo "== building lazysnap (release)"
cargo build --release --quiet
LAZYSNAP=$PWD/target/release/lazysnap

DATA=${LAZYSNAP_TESTDATA:-$PWD/target/testdata}
echo "== building the sample image from Debian packages into $DATA"
bash scripts/make-test-images.sh "$DATA" >/dev/null
SAMPLE=$DATA/debian-zstd

export LAZYSNAP_ROOT=${LAZYSNAP_ROOT:-$PWD/target/demo-root}
MNT=$(mktemp -d /tmp/lazysnap-demo.XXXXXX)
cleanup() { "$LAZYSNAP" umount "$MNT" >/dev/null 2>&1 || true; rmdir "$MNT" 2>/dev/null || true; }
trap cleanup EXIT

echo "== lazysnap import $SAMPLE"
"$LAZYSNAP" import "$SAMPLE" --name sample:latest
echo "== lazysnap images"
"$LAZYSNAP" images
echo "== lazysnap inspect sample:latest (abridged)"
"$LAZYSNAP" inspect sample:latest | head -n 24
echo "== lazysnap mount sample:latest $MNT"
"$LAZYSNAP" mount sample:latest "$MNT"
echo "== ls $MNT"
ls "$MNT"
echo "== head -3 $MNT/etc/os-release"
head -n 3 "$MNT/etc/os-release"
if [[ $(id -u) -eq 0 ]]; then
  echo "== chroot $MNT: bash and python3 from the image"
  chroot "$MNT" /bin/bash -c 'echo "bash $BASH_VERSION: $(ls /usr/bin | wc -l) programs in /usr/bin"'
  chroot "$MNT" /usr/bin/python3 -c 'import sys, sqlite3; print("python", sys.version.split()[0], "sqlite", sqlite3.sqlite_version)'
else
  echo "(not root: skipping chroot)"
fi
echo "== lazysnap umount $MNT"
"$LAZYSNAP" umount "$MNT"
