#!/usr/bin/env bash
# make-huge-image.sh OUT — the containerd benchmark's large image (issue #16: >= 500 MB, >= 20k
# files), from Debian packages: the three layers of make-bench-images.sh's big image (which must
# be in OUT/layers) plus a fourth of Go 1.19's toolchain and sources and LLVM 15's library
# (golang-1.19-go, golang-1.19-src, libllvm15: ~553 MB, ~13.6k entries). OUT/huge-gzip/: 4 gzip
# layers, ~900 MB, ~28k entries. Idempotent (a stamp with this script's and mkimage.py's hash).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPTS=$(cd "$HERE/.." && pwd)
OUT=$(cd "${1:?usage: make-huge-image.sh OUT}" && pwd)
HASH=$(cat "$HERE/make-huge-image.sh" "$SCRIPTS/mkimage.py" | sha256sum | cut -c1-16)
PKGS=(golang-1.19-go golang-1.19-src libllvm15)
[[ -f $OUT/huge.stamp && $(cat "$OUT/huge.stamp") == "$HASH" && -d $OUT/huge-gzip ]] && exit 0
for i in 1 2 3; do
  [[ -f $OUT/layers/big$i.tar ]] || { echo "make-huge-image: $OUT/layers/big$i.tar missing (make-bench-images.sh first)" >&2; exit 1; }
done
DEBS=$OUT/debs; mkdir -p "$DEBS"
need=()
for p in "${PKGS[@]}"; do compgen -G "$DEBS/${p}_*.deb" >/dev/null || need+=("$p"); done
if ((${#need[@]})); then
  (cd "$DEBS" && apt-get download -qq "${need[@]}" 2>/dev/null) ||
    { apt-get update -qq; (cd "$DEBS" && apt-get download -qq "${need[@]}" 2>/dev/null); }
fi
W=$OUT/.huge-work; rm -rf "$W"; mkdir -p "$W/st4"
for p in "${PKGS[@]}"; do dpkg-deb -x "$(compgen -G "$DEBS/${p}_*.deb" | sort | tail -1)" "$W/st4"; done
# As make-bench-images.sh packs its layers: deterministic PAX, root-owned, fixed mtimes.
tar -C "$W/st4" -cf "$OUT/layers/huge4.tar" --format=pax --numeric-owner --sort=name --owner=0 \
  --group=0 --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  --mtime=@1700000000 --clamp-mtime .
rm -rf "$OUT/huge-gzip" "$W"
python3 "$SCRIPTS/mkimage.py" "$OUT/huge-gzip" "$OUT"/layers/big{1,2,3}.tar "$OUT/layers/huge4.tar" \
  --compression pigz --comment base --comment python --comment toolchain --comment go-llvm
echo "$HASH" >"$OUT/huge.stamp"
