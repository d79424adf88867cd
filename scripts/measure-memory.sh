#!/usr/bin/env bash
# measure-memory.sh — memory of lazysnap's mount daemons (#15 item 5), as root.
#
#   1. for each span-cache size in $SIZES (default "8M 32M 256M"): a read-only mount of the image,
#      page cache dropped, a read of every file (`tar -cf - -C MNT .`), its time, the daemon's
#      RSS and anonymous memory right after and after $IDLE seconds idle;
#   2. $CONTAINERS (default 20; 0 skips) overlay-mode `mount --rw` containers of the same image,
#      each read in full: the number of lazysnap processes and their RSS in all.
#
# Env: LAZYSNAP (default target/release/lazysnap, built if missing), IMG (an OCI layout; default
# target/testdata/debian-gzip), SIZES, IDLE, CONTAINERS. Times are for orientation only: run it
# on a quiet machine.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
L=${LAZYSNAP:-$REPO/target/release/lazysnap}
[[ -x $L ]] || (cd "$REPO" && cargo build --release -q)
IMG=${IMG:-$REPO/target/testdata/debian-gzip}
[[ -d $IMG ]] || bash "$REPO/scripts/make-test-images.sh" "$REPO/target/testdata"
WORK=$(mktemp -d /tmp/lazysnap-mem.XXXXXX)
R=$WORK/root
N=${CONTAINERS:-20}
cleanup() {
  for i in $(seq 1 "$N"); do
    [[ -d $WORK/c$i ]] && "$L" --root "$R" snapshot rm "rw:$WORK/c$i" >/dev/null 2>&1 || true
  done
  awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
  pkill -f "^$L --root $R " || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$L" --root "$R" import "$IMG" --name img:latest >/dev/null
mem() { awk '/^VmRSS|^RssAnon/{printf "%s %d MiB  ", $1, $2/1024}' "/proc/$1/status"; echo; }
daemon_of() { pgrep -f "^$L --root $R mount --foreground.*$1" | head -n1; }
for cs in ${SIZES:-8M 32M 256M}; do
  mkdir -p "$WORK/ro"
  "$L" --root "$R" mount img:latest "$WORK/ro" --cache-size "$cs" >/dev/null
  pid=$(daemon_of "$WORK/ro")
  echo 3 >/proc/sys/vm/drop_caches
  s=$(date +%s.%N); tar -cf - -C "$WORK/ro" . | wc -c >/dev/null; e=$(date +%s.%N)
  printf "read-only, cache %5s: read-all %5.2f s  " "$cs" "$(echo "$e - $s" | bc)"; mem "$pid"
  sleep "${IDLE:-5}"
  printf "read-only, cache %5s: idle %2s s         " "$cs" "${IDLE:-5}"; mem "$pid"
  "$L" --root "$R" umount "$WORK/ro" >/dev/null
done
[[ $N == 0 ]] && exit 0
for i in $(seq 1 "$N"); do
  mkdir -p "$WORK/c$i"
  "$L" --root "$R" mount --rw img:latest "$WORK/c$i" >/dev/null
done
echo 3 >/proc/sys/vm/drop_caches
for i in $(seq 1 "$N"); do tar -cf - -C "$WORK/c$i" . | wc -c >/dev/null; done
total=0; procs=0
for p in $(pgrep -f "^$L --root $R "); do
  r=$(awk '/^VmRSS/{print $2}' "/proc/$p/status"); total=$((total + r)); procs=$((procs + 1))
done
echo "$N containers of one image: $procs lazysnap process(es), RSS $((total / 1024)) MiB in all"
