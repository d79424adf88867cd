#!/usr/bin/env bash
# The peers lazysnap is compared with or run beside, built from their Go modules through the Go
# module proxy, each into a fixed directory per version under /opt/lazysnap-peers
# (LAZYSNAP_PEERS_DIR overrides):
#
#   nerdctl      github.com/containerd/nerdctl/v2/cmd/nerdctl          -> nerdctl-$NERDCTL_VERSION/bin
#   cni-plugins  github.com/containernetworking/plugins/plugins/...    -> cni-plugins-$CNI_VERSION/bin
#   crictl       sigs.k8s.io/cri-tools/cmd/crictl                      -> crictl-$CRICTL_VERSION/bin
#   stargz       containerd-stargz-grpc, ctr-remote (tools/peers/stargz) -> stargz-snapshotter-$STARGZ_VERSION/bin
#   soci         soci-snapshotter-grpc, soci (tools/peers/soci)        -> soci-snapshotter-$SOCI_VERSION/bin
#   erofs-utils  mkfs.erofs, fsck.erofs, dump.erofs (C, Debian's source tarball)
#                                                                       -> erofs-utils-$EROFS_UTILS_VERSION/bin
#
#   scripts/install-peers.sh [nerdctl|cni-plugins|crictl|stargz|soci|erofs-utils ...]   # default: all
#
# stdout: one NAME=BIN_DIR line per tool (NAME upper-cased, '-' -> '_': NERDCTL, CNI_PLUGINS,
# CRICTL, STARGZ, SOCI, EROFS_UTILS), so `eval "$(scripts/install-peers.sh)"` works; progress on stderr.
#
# erofs-utils is the one peer that is not Go: containerd 2.x's erofs differ runs
# `mkfs.erofs --tar=f --aufs` (a tar stream straight to an erofs image), which erofs-utils >= 1.6
# has; Debian 12 ships 1.5 (no --tar) and trixie's 1.8 binary needs a newer glibc. So it is
# built from Debian's (trixie) source tarball, sha256-pinned, with autoconf/automake/libtool and
# the -dev packages of scripts/install-deps.sh (liblz4, liblzma, libzstd, zlib, uuid), statically
# against erofs-utils' own library; the kernel's erofs (CONFIG_EROFS_FS) mounts the images.
#
# Idempotent as install-containerd2.sh: a `.complete` marker in each bin dir (for stargz and soci
# it holds a hash of our mains' sources, for erofs-utils the tarball's sha256: a change rebuilds), one builder at a
# time per directory (flock), built into a temp dir and moved into place. Needs only `go` (Go
# 1.26 here) and the module proxy; CGO is off (static binaries, no C toolchain) except for soci
# (gcc + zlib1g-dev, see build_soci); GOTOOLCHAIN=local. erofs-utils needs a C toolchain and
# deb.debian.org instead (see build_erofs_utils).
# GOCACHE / GOMODCACHE are taken from the environment as set.
#
# Why not a plain `go install MOD/cmd/X@VERSION` for all of them:
# - nerdctl's go.mod has `replace github.com/containerd/nerdctl/mod/tigron => ./mod/tigron`
#   (a test-only nested module the proxy does not serve), which `go install pkg@version`
#   refuses. Its module (as the proxy serves it) is built as the main module of a throwaway
#   go.work whose `replace` points tigron at an empty stub: cmd/nerdctl imports no tigron package
#   outside tests, and every other requirement is the release's go.mod/go.sum as is.
# - the `cmd` modules of stargz-snapshotter and soci-snapshotter (which hold their mains) are
#   not served by the proxy (404); their root modules are. tools/peers/stargz and
#   tools/peers/soci are small mains of ours over those libraries, pinned to the same releases.
set -euo pipefail
shopt -s inherit_errexit

NERDCTL_VERSION=v2.0.5  # v2.2+ need github.com/moby/moby/v2 betas (proxy: 403); v2.1.x cmd/nerdctl imports tigron (test module, proxy: 403); v2.1.4+ not served
CNI_VERSION=v1.10.0
CRICTL_VERSION=v1.37.0
STARGZ_VERSION=v0.19.1
SOCI_VERSION=v0.16.1
EROFS_UTILS_VERSION=1.8.6
EROFS_UTILS_URL=http://deb.debian.org/debian/pool/main/e/erofs-utils/erofs-utils_${EROFS_UTILS_VERSION}.orig.tar.gz
EROFS_UTILS_SHA256=5b221dc3fd6d151425b30534ede46fb7a90dc233a8659cba0372796b0a066547
# Linux plugins of containernetworking/plugins; nerdctl's bridge networks and CRI pods use
# bridge host-local loopback portmap firewall tuning.
CNI_PLUGINS=(main/bridge main/loopback main/host-device main/ipvlan main/macvlan main/ptp main/vlan
	main/dummy main/tap ipam/host-local ipam/static ipam/dhcp meta/portmap meta/firewall
	meta/tuning meta/bandwidth meta/sbr meta/vrf)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS=$(cd "$HERE/.." && pwd)/tools/peers
PEERS=${LAZYSNAP_PEERS_DIR:-/opt/lazysnap-peers}

log() { echo "install-peers.sh: $*" >&2; }

gobuild_env() {
	env CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local GOWORK=off "$@"
}

# module_dir MOD@VERSION: download through the proxy, print its directory in GOMODCACHE.
module_dir() {
	GOTOOLCHAIN=local GOFLAGS= go mod download -json "$1" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p'
}

# stamp_ours DIR: a hash of our main's sources in tools/peers/DIR, kept in the .complete marker,
# so a changed main (a new command) is rebuilt although the peer's version is the same.
stamp_ours() {
	(cd "$TOOLS/$1" && cat go.mod go.sum $(find cmd -name '*.go' | LC_ALL=C sort)) | sha256sum | cut -d' ' -f1
}

# complete BIN STAMP: BIN/.complete exists and holds STAMP (empty STAMP: exists).
complete() {
	[[ -f $1/.complete ]] && [[ -z $2 || $(cat "$1/.complete") == "$2" ]]
}

# install NAME PREFIX BUILD_FN [STAMP]: run BUILD_FN OUT_DIR unless PREFIX/bin is complete
# (with STAMP), then print NAME=PREFIX/bin.
install() {
	local name=$1 prefix=$2 fn=$3 stamp=${4:-}
	local bin=$prefix/bin key
	key=$(tr 'a-z-' 'A-Z_' <<<"$name")
	if ! complete "$bin" "$stamp"; then
		local using=C
		if [[ $name != erofs-utils ]]; then
			command -v go >/dev/null || { log "go not found on PATH"; exit 1; }
			using=$(go version | cut -d' ' -f3)
		fi
		mkdir -p "$prefix"
		(
			flock 9
			complete "$bin" "$stamp" && exit 0
			tmp=$(mktemp -d "$prefix/.bin.XXXXXX")
			trap 'rm -rf "$tmp"' EXIT
			start=$SECONDS
			log "building $name ($using) into $bin ..."
			mkdir "$tmp/bin"
			"$fn" "$tmp/bin"
			echo "$stamp" >"$tmp/bin/.complete"
			rm -rf "$bin"
			mv "$tmp/bin" "$bin"
			log "$name built in $((SECONDS - start))s"
		) 9>"$prefix/.lock"
	else
		log "$name already installed in $bin"
	fi
	echo "$key=$bin"
}

build_nerdctl() {
	local out=$1 m=github.com/containerd/nerdctl/v2 dir w
	dir=$(module_dir "$m@$NERDCTL_VERSION")
	[[ -n $dir ]] || { log "could not download $m@$NERDCTL_VERSION"; exit 1; }
	w=$(dirname "$out")/work
	mkdir -p "$w/tigron"
	printf 'module github.com/containerd/nerdctl/mod/tigron\n\ngo 1.24\n' >"$w/tigron/go.mod"
	printf 'go %s\n\nuse %s\n\nreplace github.com/containerd/nerdctl/mod/tigron v0.0.0 => ./tigron\n' \
		"$(sed -n 's/^go //p' "$dir/go.mod")" "$dir" >"$w/go.work"
	# As nerdctl's Makefile: CGO off, -s -w, version by ldflags (the proxy's zip has no VCS revision).
	(cd "$w" && env CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local GOWORK="$w/go.work" \
		go build -trimpath -o "$out/nerdctl" \
		-ldflags "-s -w -X $m/pkg/version.Version=$NERDCTL_VERSION -X $m/pkg/version.Revision=proxy-$NERDCTL_VERSION" \
		"$m/cmd/nerdctl")
}

build_cni() {
	local out=$1 m=github.com/containernetworking/plugins p pkgs=()
	for p in "${CNI_PLUGINS[@]}"; do
		pkgs+=("$m/plugins/$p@$CNI_VERSION")
	done
	# As build_linux.sh (plus the version its release builds stamp); static since CGO is off.
	gobuild_env GOBIN="$out" go install -trimpath \
		-ldflags "-s -w -X $m/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" "${pkgs[@]}"
}

build_crictl() {
	local out=$1 m=sigs.k8s.io/cri-tools
	# As cri-tools' Makefile: CGO off, -trimpath, Version without the leading v.
	gobuild_env GOBIN="$out" go install -trimpath \
		-ldflags "-s -w -X $m/pkg/version.Version=${CRICTL_VERSION#v}" "$m/cmd/crictl@$CRICTL_VERSION"
}

# build_ours DIR OUT CGO LDFLAGS CMD...: build our mains in tools/peers/DIR (own go.mod/go.sum).
build_ours() {
	local dir=$TOOLS/$1 out=$2 cgo=$3 ldflags=$4 c
	shift 4
	[[ -f $dir/go.mod ]] || { log "missing $dir/go.mod"; exit 1; }
	for c in "$@"; do
		(cd "$dir" && gobuild_env CGO_ENABLED="$cgo" go build -mod=readonly -trimpath -o "$out/$c" -ldflags "$ldflags" "./cmd/$c")
	done
}

build_stargz() {
	local m=github.com/containerd/stargz-snapshotter
	build_ours stargz "$1" 0 "-s -w -X $m/version.Version=$STARGZ_VERSION -X $m/version.Revision=proxy-$STARGZ_VERSION" \
		containerd-stargz-grpc ctr-remote
}

build_soci() {
	local m=github.com/awslabs/soci-snapshotter
	# CGO on: soci's ztoc/compression wraps zlib in C (gzip_zinfo.c, linked -l:libz.a), so this
	# one needs gcc and Debian's zlib1g-dev (its static libz.a); the binaries link glibc dynamically.
	command -v gcc >/dev/null || { log "soci needs gcc (Debian: gcc)"; exit 1; }
	[[ -f /usr/include/zlib.h ]] || { log "soci needs zlib headers and libz.a (Debian: zlib1g-dev)"; exit 1; }
	build_ours soci "$1" 1 "-s -w -X $m/version.Version=$SOCI_VERSION -X $m/version.Revision=proxy-$SOCI_VERSION" \
		soci-snapshotter-grpc soci
}

# build_erofs_utils OUT: download the pinned tarball, check it, autogen + configure + make in a
# temp dir next to OUT, install the three tools into OUT. No shared library (--disable-shared):
# the binaries need only Debian 12's liblz4/liblzma/libzstd/zlib/libuuid runtime libraries.
build_erofs_utils() {
	local out=$1 w src tarball got tool
	w=$(dirname "$out")/work
	mkdir -p "$w"
	tarball=$w/erofs-utils_${EROFS_UTILS_VERSION}.orig.tar.gz
	for tool in gcc make autoreconf aclocal libtoolize pkg-config; do
		command -v $tool >/dev/null || { log "erofs-utils needs $tool (scripts/install-deps.sh installs it)"; exit 1; }
	done
	for h in lz4.h zlib.h uuid/uuid.h; do
		[[ -f /usr/include/$h ]] || { log "erofs-utils needs /usr/include/$h (scripts/install-deps.sh: liblz4-dev zlib1g-dev uuid-dev)"; exit 1; }
	done
	if command -v curl >/dev/null; then
		curl -fsSL --retry 3 -o "$tarball" "$EROFS_UTILS_URL"
	else
		python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$EROFS_UTILS_URL" "$tarball"
	fi
	got=$(sha256sum "$tarball" | cut -d' ' -f1)
	[[ $got == "$EROFS_UTILS_SHA256" ]] || { log "erofs-utils tarball: sha256 $got, expected $EROFS_UTILS_SHA256"; exit 1; }
	tar -xzf "$tarball" -C "$w"
	src=$w/erofs-utils-$EROFS_UTILS_VERSION
	[[ $(head -n1 "$src/VERSION") == "$EROFS_UTILS_VERSION" ]] || { log "erofs-utils: unexpected VERSION in the tarball"; exit 1; }
	# The tarball is git's tree (no configure): autogen.sh is autoreconf -i.
	(cd "$src" && ./autogen.sh && ./configure --prefix="$w/inst" --disable-shared --disable-fuse \
		--with-libzstd && make -j"$(nproc)" && make install) >"$w/build.log" 2>&1 ||
		{ tail -30 "$w/build.log" >&2; log "erofs-utils build failed (log: $w/build.log)"; exit 1; }
	for tool in mkfs.erofs fsck.erofs dump.erofs; do
		command install -m 0755 "$w/inst/bin/$tool" "$out/$tool"
	done
	"$out/mkfs.erofs" --help 2>&1 | grep -q -- '--tar=' || { log "built mkfs.erofs has no --tar"; exit 1; }
	rm -rf "$w"
}

version_of() {
	local name=$1 bin=$2
	case $name in
	nerdctl) "$bin/nerdctl" --version ;;
	cni-plugins) "$bin/bridge" </dev/null 2>&1 | head -n1 ;;
	crictl) "$bin/crictl" --version ;;
	stargz) "$bin/containerd-stargz-grpc" -version; "$bin/ctr-remote" --version ;;
	soci) "$bin/soci-snapshotter-grpc" --version; "$bin/soci" --version ;;
	erofs-utils) "$bin/mkfs.erofs" -V | head -n1 ;;
	esac
}

one() {
	local line
	case $1 in
	nerdctl) line=$(install nerdctl "$PEERS/nerdctl-${NERDCTL_VERSION#v}" build_nerdctl) ;;
	cni | cni-plugins) set -- cni-plugins; line=$(install cni-plugins "$PEERS/cni-plugins-${CNI_VERSION#v}" build_cni) ;;
	crictl) line=$(install crictl "$PEERS/crictl-${CRICTL_VERSION#v}" build_crictl) ;;
	stargz) line=$(install stargz "$PEERS/stargz-snapshotter-${STARGZ_VERSION#v}" build_stargz "$(stamp_ours stargz)") ;;
	soci) line=$(install soci "$PEERS/soci-snapshotter-${SOCI_VERSION#v}" build_soci "$(stamp_ours soci)") ;;
	erofs | erofs-utils) set -- erofs-utils; line=$(install erofs-utils "$PEERS/erofs-utils-$EROFS_UTILS_VERSION" build_erofs_utils "$EROFS_UTILS_SHA256") ;;
	*) log "unknown tool '$1' (nerdctl cni-plugins crictl stargz soci erofs-utils)"; exit 2 ;;
	esac
	version_of "$1" "${line#*=}" | sed "s/^/install-peers.sh: $1: /" >&2 || true
	echo "$line"
}

names=("$@")
((${#names[@]})) || names=(nerdctl cni-plugins crictl stargz soci erofs-utils)
for n in "${names[@]}"; do
	one "$n"
done
