#!/usr/bin/env bash
# make-bench-images.sh OUT — the benchmark's images, built from Debian packages (cached .debs).
#
#   OUT/big-gzip/, big-zstd/   3 layers, ~360 MB uncompressed, ~15k files:
#        1 base       libc, coreutils, bash, perl (+ modules), tzdata, locales, libstdc++
#        2 python     python3.11 + stdlib (+ .pyc at -O0/-O1), setuptools, pip, vim-runtime
#        3 toolchain  cpp-12 (cc1), binutils, libgcc-12-dev, libstdc++-12-dev, libc6-dev,
#                     linux-libc-dev
#   OUT/big-gzip.oci.tar       OCI archive of big-gzip (for `ctr images import`)
#   OUT/files-gzip/, files-zstd/  one layer: bin/file256 (256 MiB) and bin/file30 (30 MiB) of
#        random-ish, compressible data (hex of random bytes mixed with repeated text, ~2.3:1)
#   OUT/layers/                the uncompressed layer tars
# QUICK=1 makes files of 64 MiB and 8 MiB instead (the Debian image is still built: it is cached).
# Idempotent: a stamp with the hash of this script and mkimage.py skips the work.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPTS=$(cd "$HERE/.." && pwd)
OUT=${1:?usage: make-bench-images.sh OUT}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
MK=(python3 "$SCRIPTS/mkimage.py")
HASH=$(cat "$HERE/make-bench-images.sh" "$SCRIPTS/mkimage.py" | sha256sum | cut -c1-16)
BIG_MIB=256 SMALL_MIB=30
if [[ ${QUICK:-0} == 1 ]]; then BIG_MIB=64 SMALL_MIB=8; fi

L1_PKGS=(libc6 libgcc-s1 base-files bash libtinfo6 coreutils libacl1 libattr1 libselinux1
  libpcre2-8-0 libgmp10 libcrypt1 libssl3 perl-base perl libperl5.36 perl-modules-5.36 libdb5.3
  tzdata locales libstdc++6 libgomp1 zlib1g libbz2-1.0 liblzma5)
L2_PKGS=(libpython3.11-minimal python3.11-minimal python3-minimal libpython3.11-stdlib python3.11
  libpython3-stdlib python3 libexpat1 libffi8 libsqlite3-0 libreadline8 readline-common
  libncursesw6 libuuid1 libnsl2 libtirpc3 libtirpc-common libgssapi-krb5-2 libkrb5-3
  libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 media-types python3-pkg-resources
  python3-setuptools python3-pip vim-runtime)
L3_PKGS=(cpp-12 libgcc-12-dev libstdc++-12-dev binutils binutils-x86-64-linux-gnu libbinutils
  libctf0 libctf-nobfd0 libgprofng0 libjansson4 libisl23 libmpc3 libmpfr6 libc6-dev
  linux-libc-dev libcc1-0 libitm1 libatomic1 libquadmath0)

TAROPTS=(--format=pax --numeric-owner --sort=name --owner=0 --group=0
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime --mtime=@1700000000 --clamp-mtime)

# ---- the Debian image ----
if [[ ! -f $OUT/big.stamp || $(cat "$OUT/big.stamp") != "$HASH" || ! -d $OUT/big-zstd || ! -d $OUT/big-gzip ]]; then
  DEBS=$OUT/debs; mkdir -p "$DEBS"
  need=()
  for p in "${L1_PKGS[@]}" "${L2_PKGS[@]}" "${L3_PKGS[@]}"; do
    compgen -G "$DEBS/${p}_*.deb" >/dev/null || need+=("$p")
  done
  if ((${#need[@]})); then
    echo "bench: downloading ${#need[@]} .debs into $DEBS" >&2
    if ! (cd "$DEBS" && apt-get download -qq "${need[@]}" 2>/dev/null); then
      apt-get update -qq
      (cd "$DEBS" && apt-get download -qq "${need[@]}" 2>/dev/null)
    fi
  fi
  deb() { compgen -G "$DEBS/${1}_*.deb" | sort | tail -1; }
  W=$OUT/.work; rm -rf "$W"; mkdir -p "$W"/st{1,2,3} "$OUT/layers"
  for p in "${L1_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$W/st1"; done
  for p in "${L2_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$W/st2"; done
  for p in "${L3_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$W/st3"; done
  # .pyc files as a Debian install makes them (the host's python is the same 3.11)
  python3 -m compileall -q -o 0 -o 1 -s "$W/st2" -p / "$W/st2/usr/lib/python3.11" "$W/st2/usr/lib/python3/dist-packages" >/dev/null 2>&1 || true
  for i in 1 2 3; do
    mapfile -t top < <(cd "$W/st$i" && ls -A | LC_ALL=C sort)
    tar -C "$W/st$i" "${TAROPTS[@]}" -cf "$OUT/layers/big$i.tar" "${top[@]}"
  done
  rm -rf "$W" "$OUT"/big-gzip "$OUT"/big-zstd "$OUT"/big-gzip.oci.tar
  L=("$OUT/layers/big1.tar" "$OUT/layers/big2.tar" "$OUT/layers/big3.tar")
  "${MK[@]}" "$OUT/big-gzip" "${L[@]}" --compression gzip --oci-archive "$OUT/big-gzip.oci.tar" &
  "${MK[@]}" "$OUT/big-zstd" "${L[@]}" --compression zstd
  wait $!
  echo "$HASH" >"$OUT/big.stamp"
fi

# ---- the big-files image ----
FH="$HASH-$BIG_MIB-$SMALL_MIB"
if [[ ! -f $OUT/files.stamp || $(cat "$OUT/files.stamp") != "$FH" || ! -d $OUT/files-gzip || ! -d $OUT/files-zstd ]]; then
  W=$OUT/.work-files; rm -rf "$W"; mkdir -p "$W/st/bin" "$OUT/layers"
  python3 - "$W/st/bin" "$BIG_MIB" "$SMALL_MIB" <<'PY'
import os, random, sys
d, big, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(4000)]
def block():  # 64 KiB: half hex of random bytes, half random words
    h = rng.randbytes(16384).hex().encode()
    t = b" ".join(rng.choice(words) for _ in range(6000))[:32768]
    return h + t.ljust(32768, b".")
for name, mib in (("file256", big), ("file30", small)):
    with open(os.path.join(d, name), "wb") as f:
        for _ in range(mib * 16):
            f.write(block())
PY
  tar -C "$W/st" "${TAROPTS[@]}" -cf "$OUT/layers/files.tar" bin
  rm -rf "$OUT"/files-gzip "$OUT"/files-zstd
  "${MK[@]}" "$OUT/files-gzip" "$OUT/layers/files.tar" --compression gzip &
  "${MK[@]}" "$OUT/files-zstd" "$OUT/layers/files.tar" --compression zstd
  wait $!
  rm -rf "$W"
  echo "$FH" >"$OUT/files.stamp"
fi
