#!/usr/bin/env bash
# reference-unpack.sh LAYOUT_DIR TAG DEST — the reference root filesystem of LAYOUT_DIR:TAG,
# made by a peer tool: `umoci unpack` (as root: keeps owners, creates devices, applies xattrs,
# whiteouts and opaque dirs). Prints DEST/rootfs.
#
# DEST afterwards:  DEST/rootfs             the tree (umoci's bundle rootfs)
#                   DEST/implicit-dirs.txt  dirs no layer declares (see below), one per line
#                   DEST/bundle/...         the rest of umoci's bundle (config.json, mtree)
# DEST is replaced atomically (built as DEST.tmp.PID, renamed); an existing complete DEST is
# reused unless REFERENCE_FORCE=1.
#
# umoci 0.4.7 cannot read three things our images contain, so umoci never sees LAYOUT_DIR
# directly: `ocitool.py umoci-compat` first writes an equivalent single-manifest layout:
#   - zstd layers      -> decompressed to plain tar blobs (same bytes, same diff_id);
#                         umoci says "blob is not correct mediatype: ...tar+zstd";
#   - an image index   -> the host platform's manifest (umoci: "tag is ambiguous");
#   - GNU sparse ('S') -> that layer rewritten with the sparse files expanded (umoci:
#                         "unknown typeflag '\x53'"); PAX sparse is read by umoci itself.
# So the reference of a zstd image is umoci's unpack of the very same tar streams.
#
# Directory mtimes: umoci restores the mtime of a parent directory after it adds, replaces or
# removes (whiteout) an entry in it, so a directory that an upper layer only implies keeps
# the attributes its declaring lower layer gave it — what the merged view must show too.
# Directories that NO layer declares (a/b/c with no a/ or a/b/ entries, and "." when no layer
# has a "./" entry) are made by umoci's MkdirAll at unpack time (mode 0755, root) with "now" as
# mtime; they are listed in DEST/implicit-dirs.txt and compare_trees ignores their mtime only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $# -eq 3 ]] || { echo "usage: $0 LAYOUT_DIR TAG DEST" >&2; exit 2; }
LAYOUT=$(cd "$1" && pwd); TAG=$2; DEST=$3
[[ $(id -u) -eq 0 ]] || { echo "reference-unpack.sh: needs root (umoci must keep owners and make devices)" >&2; exit 1; }
command -v umoci >/dev/null || { echo "reference-unpack.sh: umoci not installed (scripts/install-deps.sh)" >&2; exit 1; }

if [[ -f $DEST/.complete && ${REFERENCE_FORCE:-0} != 1 ]]; then echo "$DEST/rootfs"; exit 0; fi
TMP=$DEST.tmp.$$
rm -rf "$TMP"; mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
python3 "$HERE/ocitool.py" umoci-compat "$LAYOUT" "$TAG" "$TMP/layout"
umoci unpack --image "$TMP/layout:$TAG" "$TMP/bundle" >/dev/null
python3 "$HERE/ocitool.py" implicit-dirs "$LAYOUT" "$TAG" >"$TMP/implicit-dirs.txt"
rm -rf "$TMP/layout"
mv "$TMP/bundle/rootfs" "$TMP/rootfs"
touch "$TMP/.complete"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo "$DEST/rootfs"
