#!/usr/bin/env bash
# containerd 2.x (containerd, ctr, containerd-shim-runc-v2) built from its Go module through
# the Go module proxy, into a fixed directory per version:
#
#   /opt/lazysnap-peers/containerd-$CONTAINERD2_VERSION/bin
#
# Idempotent: when the binaries of that version are there, nothing is built. Needs only `go`
# (>= the module's `go` line; Go 1.26 here) and the module proxy: CGO is off (no C toolchain, no
# libbtrfs; the btrfs snapshotter needs cgo and is left out, as the `no_btrfs` tag says).
# runc comes from Debian (scripts/install-deps.sh).
#
# stdout: the bin directory, alone on the last line (callers: `BIN=$(bash install-containerd2.sh | tail -n1)`);
# progress goes to stderr. GOCACHE / GOMODCACHE are taken from the environment as set.
# LAZYSNAP_PEERS_DIR overrides /opt/lazysnap-peers.
set -euo pipefail

CONTAINERD2_VERSION=v2.4.2

MODULE=github.com/containerd/containerd/v2
PREFIX=${LAZYSNAP_PEERS_DIR:-/opt/lazysnap-peers}/containerd-${CONTAINERD2_VERSION#v}
BIN=$PREFIX/bin
CMDS=(containerd ctr containerd-shim-runc-v2)

have_all() {
	local c
	for c in "${CMDS[@]}"; do
		[[ -x $BIN/$c ]] || return 1
	done
	[[ -f $BIN/.complete ]] || return 1
}

if have_all; then
	echo "containerd $CONTAINERD2_VERSION already installed" >&2
	echo "$BIN"
	exit 0
fi

command -v go >/dev/null || { echo "install-containerd2.sh: go not found on PATH" >&2; exit 1; }

mkdir -p "$PREFIX"
# One builder at a time (CI may start two tests that both want it).
exec 9>"$PREFIX/.lock"
flock 9
if have_all; then
	echo "containerd $CONTAINERD2_VERSION already installed" >&2
	echo "$BIN"
	exit 0
fi

tmp=$(mktemp -d "$PREFIX/.bin.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
echo "building containerd $CONTAINERD2_VERSION ($(go version | cut -d' ' -f3)) into $BIN ..." >&2
pkgs=()
for c in "${CMDS[@]}"; do
	pkgs+=("$MODULE/cmd/$c@$CONTAINERD2_VERSION")
done
# As containerd's Makefile: version stamped by ldflags, urfave_cli_no_docs; the shim as its
# release build (no_grpc, static since CGO is off).
ldflags="-s -w -X $MODULE/version.Version=$CONTAINERD2_VERSION -X $MODULE/version.Package=$MODULE"
env GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local \
	go install -trimpath -tags "no_btrfs urfave_cli_no_docs" -ldflags "$ldflags" "${pkgs[@]:0:2}"
env GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local \
	go install -trimpath -tags "no_btrfs urfave_cli_no_docs no_grpc" -ldflags "$ldflags" "${pkgs[2]}"

mkdir -p "$BIN"
for c in "${CMDS[@]}"; do
	mv -f "$tmp/$c" "$BIN/$c"
done
touch "$BIN/.complete"
"$BIN/containerd" --version >&2
echo "containerd $CONTAINERD2_VERSION built in $((SECONDS - start))s" >&2
echo "$BIN"
