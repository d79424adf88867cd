#!/usr/bin/env bash
# Installs the benchmark's peers (scripts/bench): Debian's squashfuse, squashfs-tools,
# fuse-overlayfs, pigz, zstd, containerd, runc; and a venv in bench/.venv with ratarmount and
# matplotlib from PyPI. Idempotent: a second run only checks.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
bash "$HERE/install-deps.sh"
PACKAGES=(squashfuse squashfs-tools fuse-overlayfs pigz zstd gzip tar python3-venv python3-pip
  containerd runc fuse3)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bench-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
VENV=$REPO/bench/.venv
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import ratarmount, matplotlib' 2>/dev/null; then
  echo "bench-deps: pip install ratarmount matplotlib into $VENV" >&2
  "$VENV/bin/pip" install -q ratarmount matplotlib
fi
