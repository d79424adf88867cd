#!/usr/bin/env bash
# make-test-images.sh [OUT] — real OCI images made of Debian 12 packages, built offline
# (only `apt-get download` talks to the network; .debs are cached under OUT/debs).
#
# Default OUT: <repo>/target/testdata. Idempotent: a stamp (OUT/debian.stamp) holds the sha256 of
# this script and of the helpers it runs; when it matches and every output exists, nothing is done.
# Needs root for the chroot smoke checks (skipped with a warning otherwise).
#
# Layers (the same three uncompressed tars in every image below):
#   1 base     libc6, libgcc-s1, coreutils, bash, base-files and the libraries bash/coreutils load
#              (dpkg-deb -x into a staging dir, GNU tar --format=pax --sort=name --numeric-owner
#              --xattrs, entries prefixed "./" including the root entry "./"; mtimes as in the
#              packages, clamped to the newest packaged file's mtime so dirs made while staging
#              are deterministic). Checked: `chroot stage1 /bin/bash -c 'ls /'` and ld.so --list.
#   2 python   python3.11 (+ -minimal, lib*, python3, python3-minimal, stdlib) and its libraries,
#              plus __pycache__/*.pyc compiled in a chroot (so ~3k files), plus a hardlink triple
#              usr/share/lazysnap/hl/{orig,link1,link2}. Entries WITHOUT "./" prefix, no root
#              entry. Checked: `chroot stage1+2 python3 -c 'import json,sqlite3;print(1)'`.
#   3 changes  scripts/debian-changes-layer.py (Python tarfile, PAX): whiteouts, an opaque dir,
#              overwrites, mode/owner change, file<->dir replacement, retargeted symlinks,
#              hardlinks (one overriding a lower hardlink sibling), setuid/setgid/sticky, xattrs
#              incl. binary security.capability, fifo/char/block devices, sub-second mtimes,
#              uid/gid > 2^21. See that script's docstring for the exact list.
#
# Outputs in OUT (all images tagged "latest"):
#   debian-gzip/        OCI layout; layers 1 and 3 `gzip -n`, layer 2 `pigz` (all +gzip)
#   debian-zstd/        OCI layout; every layer one zstd frame (+zstd)
#   debian-none/        OCI layout; uncompressed layers (.tar)
#   debian-gzip.oci.tar OCI archive (tar of debian-gzip/)
#   debian-docker.tar   `docker save` archive, name lazysnap-test/debian:latest; made by
#                       `skopeo copy oci:debian-gzip:latest docker-archive:...` (mkimage.py's own
#                       classic writer if skopeo fails)
#   multiarch/          image index (index.json -> nested index blob, tag "latest") with
#                       linux/amd64 and linux/arm64 manifests: layers 1-3 (uncompressed) + a 4th
#                       per-platform layer holding etc/lazysnap-platform ("linux/amd64\n" or
#                       "linux/arm64\n"), so a test sees which platform was chosen
#   multiarch-flat/     the same two manifests listed directly in index.json (both annotated
#                       with tag "latest" and their platform)
#   debian-layers/      layer{1,2,3}.tar, the uncompressed layer tars (diff_ids = their sha256)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-$HERE/../target/testdata}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

exec 9>"$OUT/.debian.lock"
flock 9

HASH=$(cat "$HERE/make-test-images.sh" "$HERE/mkimage.py" "$HERE/debian-changes-layer.py" | sha256sum | cut -d' ' -f1)
OUTPUTS=(debian-gzip debian-zstd debian-none debian-gzip.oci.tar debian-docker.tar multiarch multiarch-flat debian-layers)
if [[ -f $OUT/debian.stamp && $(cat "$OUT/debian.stamp") == "$HASH" ]]; then
  ok=1
  for o in "${OUTPUTS[@]}"; do [[ -e $OUT/$o ]] || ok=0; done
  if ((ok)); then echo "debian test images up to date in $OUT"; exit 0; fi
fi
rm -f "$OUT/debian.stamp"
START=$(date +%s)

BASE_PKGS=(libc6 libgcc-s1 base-files bash libtinfo6 coreutils libacl1 libattr1 libselinux1
  libpcre2-8-0 libgmp10 libcrypt1 libssl3)
PY_PKGS=(libpython3.11-minimal python3.11-minimal python3-minimal libpython3.11-stdlib python3.11
  libpython3-stdlib python3 libexpat1 zlib1g libffi8 libbz2-1.0 liblzma5 libsqlite3-0
  libreadline8 readline-common libncursesw6 libuuid1 libnsl2 libtirpc3 libtirpc-common libdb5.3
  libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 media-types)

# ---- .debs (cached) ----
DEBS=$OUT/debs
mkdir -p "$DEBS"
need=()
for p in "${BASE_PKGS[@]}" "${PY_PKGS[@]}"; do
  compgen -G "$DEBS/${p}_*.deb" >/dev/null || need+=("$p")
done
if ((${#need[@]})); then
  echo "downloading ${#need[@]} .debs into $DEBS" >&2
  if ! (cd "$DEBS" && apt-get download -qq "${need[@]}" 2>/dev/null); then
    apt-get update -qq
    (cd "$DEBS" && apt-get download -qq "${need[@]}")
  fi
fi
deb() { local f; f=$(compgen -G "$DEBS/${1}_*.deb" | sort | tail -1); echo "$f"; }

# ---- staging ----
WORK=$OUT/.work-debian
rm -rf "$WORK"
mkdir -p "$WORK/st1" "$WORK/st2"
for p in "${BASE_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$WORK/st1"; done
for p in "${PY_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$WORK/st2"; done
# clamp epochs: the newest packaged file of each layer (taken now, before .pyc files exist)
clamp_epoch() { find "$1" -type f -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1; }
E1=$(clamp_epoch "$WORK/st1")
E2=$(clamp_epoch "$WORK/st2")

# a hardlink triple in layer 2 (Debian packages here ship none); layer 3 overwrites link1
mkdir -p "$WORK/st2/usr/share/lazysnap/hl"
printf 'one inode, three names (layer 2)\n' >"$WORK/st2/usr/share/lazysnap/hl/orig"
touch -d @1690000000 "$WORK/st2/usr/share/lazysnap/hl/orig"
ln "$WORK/st2/usr/share/lazysnap/hl/orig" "$WORK/st2/usr/share/lazysnap/hl/link1"
ln "$WORK/st2/usr/share/lazysnap/hl/orig" "$WORK/st2/usr/share/lazysnap/hl/link2"

ROOT=0; [[ $(id -u) -eq 0 ]] && ROOT=1
if ((ROOT)); then
  for b in /bin/bash /bin/ls; do
    if chroot "$WORK/st1" /lib64/ld-linux-x86-64.so.2 --list "$b" | grep -q 'not found'; then
      chroot "$WORK/st1" /lib64/ld-linux-x86-64.so.2 --list "$b" >&2
      echo "layer 1: $b has unresolved libraries" >&2; exit 1
    fi
  done
  [[ $(chroot "$WORK/st1" /bin/bash -c 'ls / | wc -l') -gt 5 ]] || { echo "layer 1: chroot bash/ls failed" >&2; exit 1; }
  # merged 1+2: byte-compile the stdlib (the .pyc files go into layer 2), then smoke-test python
  mkdir "$WORK/m12"
  cp -a "$WORK/st1/." "$WORK/m12/"
  cp -a "$WORK/st2/." "$WORK/m12/"
  # (no -j: the chroot has no /dev/shm); optimisation levels 0 and 1 for bulk (~1.1k files)
  chroot "$WORK/m12" /usr/bin/python3 -m compileall -q -o 0 -o 1 /usr/lib/python3.11 >/dev/null 2>&1 || true
  [[ $(find "$WORK/m12/usr/lib/python3.11" -name "*.pyc" | wc -l) -gt 500 ]] || { echo "compileall failed" >&2; exit 1; }
  (cd "$WORK/m12" && find usr/lib/python3.11 -name '*.pyc' -print0 | sort -z) >"$WORK/pyc.list"
  tar -C "$WORK/m12" --null -T "$WORK/pyc.list" -cf - | tar -C "$WORK/st2" -xpf -
  [[ $(chroot "$WORK/m12" /usr/bin/python3 -c 'import json,sqlite3;print(1)') == 1 ]] ||
    { echo "layers 1+2: python3 smoke test failed" >&2; exit 1; }
  rm -rf "$WORK/m12"
else
  echo "WARNING: not root: chroot smoke checks and .pyc compilation skipped, all files" \
    "recorded as 0:0 (var/local loses gid 50): these images differ from root-built ones" >&2
fi

# ---- layer tars ----
LAYERS=$OUT/debian-layers
rm -rf "$LAYERS"; mkdir -p "$LAYERS"
TAROPTS=(--format=pax --numeric-owner --xattrs --xattrs-include='*' --sort=name
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime)
((ROOT)) || TAROPTS+=(--owner=0 --group=0)
tar -C "$WORK/st1" "${TAROPTS[@]}" --mtime=@"$E1" --clamp-mtime -cf "$LAYERS/layer1.tar" .
mapfile -t TOP2 < <(cd "$WORK/st2" && ls -A | LC_ALL=C sort)
tar -C "$WORK/st2" "${TAROPTS[@]}" --mtime=@"$E2" --clamp-mtime -cf "$LAYERS/layer2.tar" "${TOP2[@]}"
python3 "$HERE/debian-changes-layer.py" "$WORK/st1" "$WORK/st2" "$LAYERS/layer3.tar"
L=("$LAYERS/layer1.tar" "$LAYERS/layer2.tar" "$LAYERS/layer3.tar")

# ---- images ----
MK=(python3 "$HERE/mkimage.py")
C=(--comment "base: libc6 coreutils bash base-files" --comment "python3.11" --comment "changes")
rm -rf "$OUT"/debian-{gzip,zstd,none} "$OUT"/multiarch "$OUT"/multiarch-flat "$OUT"/debian-gzip.oci.tar "$OUT"/debian-docker.tar
"${MK[@]}" "$OUT/debian-gzip" "${L[0]}:gzip" "${L[1]}:pigz" "${L[2]}:gzip" "${C[@]}" \
  --oci-archive "$OUT/debian-gzip.oci.tar" &
PID_GZ=$!
"${MK[@]}" "$OUT/debian-zstd" "${L[@]}" --compression zstd "${C[@]}" &
PID_ZS=$!
"${MK[@]}" "$OUT/debian-none" "${L[@]}" --compression none "${C[@]}"
wait "$PID_GZ"
wait "$PID_ZS"

for p in amd64 arm64; do
  d=$WORK/plat-$p; mkdir -p "$d/etc"; printf 'linux/%s\n' "$p" >"$d/etc/lazysnap-platform"
  touch -d @1700000000 "$d/etc/lazysnap-platform" "$d/etc"
  # only the file, no "etc/" entry: /etc is implied and keeps layer 3's attributes
  tar -C "$d" "${TAROPTS[@]}" --owner=0 --group=0 -cf "$LAYERS/platform-$p.tar" etc/lazysnap-platform
done
for v in multiarch multiarch-flat; do
  mkdir -p "$OUT/$v/blobs/sha256"
  cp -al "$OUT/debian-none/blobs/sha256/." "$OUT/$v/blobs/sha256/"   # same layer blobs: no copy
  flat=(); [[ $v == multiarch-flat ]] && flat=(--flat-index)
  "${MK[@]}" "$OUT/$v" "${L[@]}" --compression none "${C[@]}" "${flat[@]}" \
    --platforms linux/amd64,linux/arm64 \
    --platform-layer "linux/amd64=$LAYERS/platform-amd64.tar" \
    --platform-layer "linux/arm64=$LAYERS/platform-arm64.tar"
  # drop blobs the new index does not reach (the debian-none manifest/config)
  python3 - "$OUT/$v" <<'EOF'
import json, os, sys
root = sys.argv[1]; b = os.path.join(root, "blobs", "sha256"); keep = set()
def walk(d):
    keep.add(d["digest"].split(":")[1])
    if d["mediaType"].endswith(("manifest.v1+json", "index.v1+json")):
        j = json.load(open(os.path.join(b, d["digest"].split(":")[1])))
        for x in j.get("manifests", []): walk(x)
        if "config" in j: keep.add(j["config"]["digest"].split(":")[1])
        for x in j.get("layers", []): keep.add(x["digest"].split(":")[1])
for d in json.load(open(os.path.join(root, "index.json")))["manifests"]: walk(d)
for f in os.listdir(b):
    if f not in keep: os.unlink(os.path.join(b, f))
EOF
done

if ! skopeo copy -q "oci:$OUT/debian-gzip:latest" \
    "docker-archive:$OUT/debian-docker.tar:lazysnap-test/debian:latest" >/dev/null 2>"$WORK/skopeo.err"; then
  echo "skopeo docker-archive failed ($(head -c 300 "$WORK/skopeo.err")); using mkimage.py's writer" >&2
  rm -f "$OUT/debian-docker.tar"
  rm -rf "$WORK/dock"
  "${MK[@]}" "$WORK/dock" "${L[@]}" --compression none "${C[@]}" \
    --docker-archive "$OUT/debian-docker.tar" --docker-name lazysnap-test/debian:latest
fi

rm -rf "$WORK"
echo "$HASH" >"$OUT/debian.stamp"
sz() { du -sb "$1" | cut -f1 | awk '{printf "%.1f MiB", $1/1048576}'; }
NFILES=$(for t in "${L[@]}"; do tar --warning=no-unknown-keyword -tf "$t"; done | wc -l)
echo "debian test images in $OUT: $NFILES tar entries in 3 layers," \
  "uncompressed $(sz "$LAYERS/layer1.tar") + $(sz "$LAYERS/layer2.tar") + $(sz "$LAYERS/layer3.tar")," \
  "gzip layout $(sz "$OUT/debian-gzip"), zstd layout $(sz "$OUT/debian-zstd"), none layout $(sz "$OUT/debian-none")," \
  "built in $(( $(date +%s) - START ))s"
