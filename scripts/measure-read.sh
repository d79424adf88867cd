#!/usr/bin/env bash
# measure-read.sh [RUNS] — read speed of a lazysnap mount against its floor, side by side.
#
# As root. For each test image (debian-gzip, debian-zstd from target/testdata; built with
# scripts/make-test-images.sh if missing) it times, RUNS times (default 3, median printed):
#   floor      `gzip -dc` / `zstd -dc` of every layer blob to /dev/null, page cache dropped
#   extr cold  `tar -cf - -C EXTRACTED . | wc -c` of an extracted copy, page cache dropped
#   extr warm  the same again, page cache warm
#   mnt cold   `tar -cf - -C MNT . | wc -c` through a fresh lazysnap mount, page cache dropped
#   mnt warm   the same again on that mount (kernel page cache warm)
# and prints the ratios mnt cold / floor and mnt warm / extr warm.
#
# Env: LAZYSNAP=path to a prebuilt binary (skips `cargo build --release`); KEEP=1 keeps the
# temp root. Each cold run remounts, so the daemon's span cache starts empty too.
set -euo pipefail

RUNS=${1:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TESTDATA=$REPO/target/testdata

if [[ $(id -u) -ne 0 ]]; then
  echo "measure-read.sh: needs root (drop_caches, mount)" >&2
  exit 1
fi

if [[ -z ${LAZYSNAP:-} ]]; then
  (cd "$REPO" && cargo build --release -q)
  LAZYSNAP=$REPO/target/release/lazysnap
fi
if [[ ! -d $TESTDATA/debian-gzip || ! -d $TESTDATA/debian-zstd ]]; then
  bash "$HERE/make-test-images.sh" "$TESTDATA"
fi

WORK=$(mktemp -d /var/tmp/lazysnap-measure.XXXXXX)
R=$WORK/root
MNT=$WORK/mnt
mkdir -p "$R" "$MNT"
cleanup() {
  if mountpoint -q "$MNT" 2>/dev/null; then "$LAZYSNAP" --root "$R" umount "$MNT" >/dev/null || true; fi
  if [[ -z ${KEEP:-} ]]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# Runs "$@" and prints its wall time in seconds.
timed() {
  local t0 t1
  t0=$(now)
  "$@" >/dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
tar_bytes() { tar -cf - -C "$1" . | wc -c; }

# Layer blob paths of an OCI layout (first manifest of index.json).
layer_blobs() {
  python3 - "$1" <<'EOF'
import json, sys, os
d = sys.argv[1]
def blob(dg):
    a, h = dg.split(":", 1)
    return os.path.join(d, "blobs", a, h)
idx = json.load(open(os.path.join(d, "index.json")))
m = json.load(open(blob(idx["manifests"][0]["digest"])))
for l in m["layers"]:
    print(blob(l["digest"]))
EOF
}

floor() {
  local tool=$1
  shift
  for b in "$@"; do $tool -dc "$b" >/dev/null; done
}

mount_image() {
  "$LAZYSNAP" --root "$R" mount "$1" "$MNT" >/dev/null
}
umount_image() {
  "$LAZYSNAP" --root "$R" umount "$MNT" >/dev/null
}

declare -A RES
for img in debian-gzip debian-zstd; do
  case $img in
    *gzip) tool=gzip ;;
    *zstd) tool=zstd ;;
  esac
  "$LAZYSNAP" --root "$R" import "$TESTDATA/$img" --name "$img" >/dev/null
  mapfile -t blobs < <(layer_blobs "$TESTDATA/$img")
  # An extracted copy of the merged view, for the extracted-tree peers.
  EXTR=$WORK/extracted-$img
  mkdir -p "$EXTR"
  mount_image "$img"
  cp -a "$MNT/." "$EXTR/"
  bytes_mnt=$(tar_bytes "$MNT")
  bytes_ext=$(tar_bytes "$EXTR")
  umount_image
  if [[ $bytes_mnt != "$bytes_ext" ]]; then
    echo "warning: $img: tar of mount is $bytes_mnt bytes, of extracted copy $bytes_ext" >&2
  fi
  f=() ec=() ew=() mc=() mw=()
  for ((i = 0; i < RUNS; i++)); do
    drop
    f+=("$(timed floor "$tool" "${blobs[@]}")")
    drop
    ec+=("$(timed tar_bytes "$EXTR")")
    ew+=("$(timed tar_bytes "$EXTR")")
    mount_image "$img"
    drop
    mc+=("$(timed tar_bytes "$MNT")")
    mw+=("$(timed tar_bytes "$MNT")")
    umount_image
  done
  RES[$img]="$(median "${f[@]}") $(median "${ec[@]}") $(median "${ew[@]}") $(median "${mc[@]}") $(median "${mw[@]}") $bytes_mnt"
done

printf '\nmedian of %s runs, seconds (tar stream bytes in the last column)\n' "$RUNS"
printf '%-12s %8s %9s %9s %9s %9s %11s %11s %12s\n' image floor 'extr cold' 'extr warm' 'mnt cold' 'mnt warm' 'cold/floor' 'warm/extrW' bytes
for img in debian-gzip debian-zstd; do
  read -r f ec ew mc mw bytes <<<"${RES[$img]}"
  printf '%-12s %8.3f %9.3f %9.3f %9.3f %9.3f %11.2f %11.2f %12s\n' "$img" "$f" "$ec" "$ew" "$mc" "$mw" \
    "$(echo "$mc / $f" | bc -l)" "$(echo "$mw / $ew" | bc -l)" "$bytes"
done
