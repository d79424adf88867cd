#!/usr/bin/env bash
# containerd 2.x's clients, built from their Go modules through the Go module proxy, each into
# a fixed directory per version under /opt/lazysnap-peers (LAZYSNAP_PEERS_DIR overrides):
#
#   nerdctl  github.com/containerd/nerdctl/v2/cmd/nerdctl      -> nerdctl-$NERDCTL_VERSION/bin
#   cni      github.com/containernetworking/plugins/plugins/... -> cni-plugins-$CNI_VERSION/bin
#   crictl   sigs.k8s.io/cri-tools/cmd/crictl                  -> crictl-$CRICTL_VERSION/bin
#
#   scripts/install-cri-tools.sh [nerdctl|cni|crictl ...]   # default: all three
#
# Idempotent (a `.complete` marker per directory; one builder at a time per directory). CGO is
# off: static binaries, no C toolchain. stdout: NAME=BIN_DIR per tool; progress on stderr.
set -euo pipefail

NERDCTL_VERSION=v2.0.3  # newer releases need modules the proxy does not serve (moby/moby/v2 betas; nerdctl/mod/tigron, a test-only nested module imported by cmd/nerdctl/helpers)
CNI_VERSION=v1.10.0
CRICTL_VERSION=v1.37.0
# What nerdctl's bridge networks and CRI pods use.
CNI_PLUGINS=(bridge host-local loopback portmap firewall tuning)

PEERS=${LAZYSNAP_PEERS_DIR:-/opt/lazysnap-peers}

# build NAME PREFIX TAGS LDFLAGS PKG@VERSION...: go install into PREFIX/bin unless complete.
build() {
	local name=$1 prefix=$2 tags=$3 ldflags=$4
	shift 4
	local bin=$prefix/bin
	if [[ -f $bin/.complete ]]; then
		echo "$name already installed in $bin" >&2
		echo "$name=$bin"
		return
	fi
	command -v go >/dev/null || { echo "install-cri-tools.sh: go not found on PATH" >&2; exit 1; }
	mkdir -p "$prefix"
	(
		flock 9
		if [[ -f $bin/.complete ]]; then
			exit 0
		fi
		local tmp start=$SECONDS
		tmp=$(mktemp -d "$prefix/.bin.XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		echo "building $name ($(go version | cut -d' ' -f3)) into $bin ..." >&2
		env GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local \
			go install -trimpath -tags "$tags" -ldflags "$ldflags" "$@"
		mkdir -p "$bin"
		mv -f "$tmp"/* "$bin/"
		touch "$bin/.complete"
		echo "$name built in $((SECONDS - start))s" >&2
	) 9>"$prefix/.lock"
	echo "$name=$bin"
}

nerdctl() {
	local m=github.com/containerd/nerdctl/v2
	build nerdctl "$PEERS/nerdctl-${NERDCTL_VERSION#v}" "no_btrfs" \
		"-s -w -X $m/pkg/version.Version=$NERDCTL_VERSION" "$m/cmd/nerdctl@$NERDCTL_VERSION"
}

cni() {
	local m=github.com/containernetworking/plugins pkgs=() p
	for p in "${CNI_PLUGINS[@]}"; do
		case $p in
			bridge | loopback) pkgs+=("$m/plugins/main/$p@$CNI_VERSION") ;;
			host-local) pkgs+=("$m/plugins/ipam/$p@$CNI_VERSION") ;;
			*) pkgs+=("$m/plugins/meta/$p@$CNI_VERSION") ;;
		esac
	done
	build cni "$PEERS/cni-plugins-${CNI_VERSION#v}" "" \
		"-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" \
		"${pkgs[@]}"
}

crictl() {
	build crictl "$PEERS/crictl-${CRICTL_VERSION#v}" "" \
		"-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
		"sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}

tools=("$@")
((${#tools[@]})) || tools=(nerdctl cni crictl)
for t in "${tools[@]}"; do
	case $t in
		nerdctl | cni | crictl) "$t" ;;
		*) echo "install-cri-tools.sh: unknown tool $t (nerdctl, cni, crictl)" >&2; exit 2 ;;
	esac
done
