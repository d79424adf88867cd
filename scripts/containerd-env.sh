#!/usr/bin/env bash
# A private containerd on lazysnap, for tests and for trying it out: its own root, state and
# socket under one directory, `lazysnap serve` as its proxy snapshotter (and proxy diff plugin
# when containerd is 1.7 or newer), both as background processes with pid files and logs.
#
#   scripts/containerd-env.sh start [DIR]   # default DIR: target/containerd-env ($CONTAINERD_ENV_DIR)
#   scripts/containerd-env.sh env   [DIR]   # prints the exports (eval "$(... env)")
#   scripts/containerd-env.sh stop  [DIR]   # SIGTERM both, waits, unmounts leftovers
#   scripts/containerd-env.sh status [DIR]
#   scripts/containerd-env.sh restart-snapshotter [DIR]   # SIGTERM + start `lazysnap serve` again
#   scripts/containerd-env.sh rpull REF [DIR]  # pull REF lazily (tools/rpull: client.Pull + cri.* labels)
#
# Then: ctr -a DIR/containerd.sock -n test images import --snapshotter lazysnap IMAGE.tar
# rpull pulls into namespace $CONTAINERD_NAMESPACE (default "default"); layers with a lazysnap
# index artifact (`lazysnap index push`) are not fetched, mounts read them from the registry.
# $LAZYSNAP_SERVE_ARGS adds arguments to `lazysnap serve` (e.g. --no-background-fetch).
# The lazysnap binary: $LAZYSNAP_BIN, else target/{release,debug}/lazysnap, else PATH.
# $CONTAINERD_BIN_DIR: take containerd, ctr and the runc shim from there (containerd 2.x built
# by scripts/install-containerd2.sh) instead of PATH (Debian's 1.6). With containerd 2.x the
# transfer service (`ctr images pull/import` use it) unpacks onto lazysnap with lazysnap's
# differ and passes the remote-snapshot labels; $CONTAINERD_CRI=1 also runs the CRI plugin with
# lazysnap as its snapshotter (socket DIR/containerd.sock, for crictl): $CRI_SANDBOX_IMAGE is
# its pause image (import it into namespace k8s.io), $CNI_BIN_DIR its CNI plugins, DIR/cni/net.d
# its CNI config and DIR/certs.d its registry hosts (containerd's hosts.toml).
# $STARGZ_BIN_DIR (scripts/install-peers.sh): also run the peer stargz-snapshotter
# (containerd-stargz-grpc, socket DIR/stargz.sock) as proxy snapshotter `stargz`;
# $STARGZ_PLAIN_HTTP lists host:port registries it reaches by plain HTTP.
# $EROFS_BIN_DIR (containerd 2.x; scripts/install-peers.sh erofs-utils: mkfs.erofs >= 1.6):
# put on containerd's PATH, so its built-in erofs differ loads (it needs `mkfs.erofs --tar`)
# beside the erofs snapshotter; the transfer service unpacks snapshotter `erofs` with differ
# `erofs` (each layer converted to an erofs image file, mounted read-only by the
# kernel: file-backed on Linux >= 6.12, else over a loop device).
# $SOCI_BIN_DIR (scripts/install-peers.sh soci): also run the peer soci-snapshotter-grpc
# (socket DIR/soci.sock, root DIR/soci) as proxy snapshotter `soci`; $SOCI_PLAIN_HTTP lists
# host:port registries it reaches by plain HTTP. It lazily loads SOCI-enabled images (index
# manifest v2: tools/peers/soci `soci convert`).
# Needs root (containerd, FUSE mounts), Debian's containerd and runc.
set -euo pipefail

if [[ -n ${CONTAINERD_BIN_DIR:-} ]]; then
    export PATH=$CONTAINERD_BIN_DIR:$PATH
fi
if [[ -n ${EROFS_BIN_DIR:-} ]]; then
    [[ -x $EROFS_BIN_DIR/mkfs.erofs ]] || { echo "containerd-env: no mkfs.erofs in $EROFS_BIN_DIR" >&2; exit 1; }
    export PATH=$EROFS_BIN_DIR:$PATH
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cmd=${1:-}
if [[ $cmd == rpull ]]; then
    ref=${2:-}
    [[ -n $ref ]] || { echo "usage: $0 rpull REF [DIR]" >&2; exit 2; }
    shift
fi
dir=${2:-${CONTAINERD_ENV_DIR:-$here/target/containerd-env}}
START_TIMEOUT=${START_TIMEOUT:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}

die() { echo "containerd-env: $*" >&2; exit 1; }

lazysnap_bin() {
    if [[ -n ${LAZYSNAP_BIN:-} ]]; then echo "$LAZYSNAP_BIN"; return; fi
    # The newer of the release and debug builds.
    local b best=
    for b in "$here/target/release/lazysnap" "$here/target/debug/lazysnap"; do
        if [[ -x $b && ( -z $best || $b -nt $best ) ]]; then best=$b; fi
    done
    if [[ -n $best ]]; then echo "$best"; return; fi
    command -v lazysnap || die "no lazysnap binary: build it (cargo build) or set LAZYSNAP_BIN"
}

# Paths (the FUSE mountpoints are compared as canonical paths: resolve DIR once).
setup_paths() {
    mkdir -p "$dir"
    dir=$(realpath "$dir")
    croot=$dir/root
    cstate=$dir/state
    csock=$dir/containerd.sock
    lsock=$dir/lazysnap.sock
    lroot=$dir/lazysnap
    content=$croot/io.containerd.content.v1.content
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

containerd_version() { containerd --version | awk '{print $3}' | sed 's/^v//'; }
containerd_major() { local v; v=$(containerd_version); echo "${v%%.*}"; }

# containerd >= 1.7 loads proxy diff plugins; 1.6 panics on an unknown proxy plugin type.
supports_proxy_diff() {
    local v
    v=$(containerd_version)
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    (( major > 1 || (major == 1 && minor >= 7) ))
}

# 1 when this process may not lower its oom_score_adj (no CAP_SYS_RESOURCE).
restricted_oom() {
    local eff
    eff=$(awk '/^CapEff/ {print $2}' /proc/self/status)
    if (( (16#$eff >> 24) & 1 )); then echo 0; else echo 1; fi
}

# The host's platform as containerd spells it.
oci_platform() {
    case $(uname -m) in
        x86_64) echo linux/amd64 ;; aarch64) echo linux/arm64 ;; *) echo "linux/$(uname -m)" ;;
    esac
}

write_config() {
    local major cri_plugins='"io.containerd.grpc.v1.cri"'
    major=$(containerd_major)
    if (( major >= 2 )); then
        cri_plugins='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images"'
    fi
    local disabled="[$cri_plugins]"
    [[ ${CONTAINERD_CRI:-0} == 1 ]] && disabled="[]"
    {
        if (( major >= 2 )); then echo "version = 3"; else echo "version = 2"; fi
        cat <<EOF
root = "$croot"
state = "$cstate"
disabled_plugins = $disabled

[grpc]
  address = "$csock"

[ttrpc]
  address = "$csock.ttrpc"

[proxy_plugins]
  [proxy_plugins.lazysnap]
    type = "snapshot"
    address = "$lsock"
EOF
        if (( major >= 2 )); then
            # exports: kubelet's image-fs stats read the root; the transfer service adds the
            # remote-snapshot labels (cri.image-ref, cri.layer-digest, ...) only when asked.
            cat <<EOF
    [proxy_plugins.lazysnap.exports]
      root = "$lroot"
      enable_remote_snapshot_annotations = "true"
EOF
        fi
        if [[ -n ${STARGZ_BIN_DIR:-} ]]; then
            cat <<EOF
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "$dir/stargz.sock"
    [proxy_plugins.stargz.exports]
      root = "$dir/stargz"
      enable_remote_snapshot_annotations = "true"
EOF
        fi
        if [[ -n ${SOCI_BIN_DIR:-} ]]; then
            cat <<EOF
  [proxy_plugins.soci]
    type = "snapshot"
    address = "$dir/soci.sock"
    [proxy_plugins.soci.exports]
      root = "$dir/soci"
      address = "$dir/soci.sock"
      enable_remote_snapshot_annotations = "true"
EOF
        fi
        if supports_proxy_diff; then
            cat <<EOF
  [proxy_plugins.lazysnap-diff]
    type = "diff"
    address = "$lsock"

[plugins."io.containerd.service.v1.diff-service"]
  default = ["lazysnap-diff", "walking"]
EOF
        fi
        if (( major >= 2 )); then
            # The transfer service unpacks only for the (platform, snapshotter) pairs listed
            # here, each with one differ (no fallback list): lazysnap's for lazysnap.
            cat <<EOF

[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$(oci_platform)"
    snapshotter = "lazysnap"
    differ = "lazysnap-diff"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$(oci_platform)"
    snapshotter = "overlayfs"
    differ = "walking"
EOF
            if [[ -n ${STARGZ_BIN_DIR:-} ]]; then
                cat <<EOF
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$(oci_platform)"
    snapshotter = "stargz"
    differ = "walking"
EOF
            fi
            if [[ -n ${SOCI_BIN_DIR:-} ]]; then
                # Layers soci does not mount lazily (no zTOC: under its min-layer-size) are
                # applied by containerd as for overlayfs.
                cat <<EOF
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$(oci_platform)"
    snapshotter = "soci"
    differ = "walking"
EOF
            fi
            if [[ -n ${EROFS_BIN_DIR:-} ]]; then
                # containerd's erofs snapshotter and differ (built in; the differ needs
                # mkfs.erofs --tar=f, from EROFS_BIN_DIR). Defaults: the differ converts each
                # layer's tar stream (mkfs.erofs --tar=f --aufs -Enoinline_data -b4096) into
                # an erofs image; the snapshotter mounts them read-only (file-backed or loop) under
                # an overlayfs for the container.
                cat <<EOF
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "$(oci_platform)"
    snapshotter = "erofs"
    differ = "erofs"
EOF
            fi
            if [[ ${CONTAINERD_CRI:-0} == 1 ]]; then
                cat <<EOF

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "lazysnap"
  disable_snapshot_annotations = false
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "${CRI_SANDBOX_IMAGE:-registry.k8s.io/pause:3.10}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "$dir/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  # Pods ask for oom_score_adj -998 (pause) and below; a machine whose root lacks
  # CAP_SYS_RESOURCE (VMs, containers) refuses that: keep it >= containerd's own.
  restrict_oom_score_adj = $(if [[ $(restricted_oom) == 1 ]]; then echo true; else echo false; fi)

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["${CNI_BIN_DIR:-/opt/cni/bin}"]
  conf_dir = "$dir/cni/net.d"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  snapshotter = "lazysnap"
EOF
            fi
        fi
    } >"$dir/config.toml"
}

wait_for() { # SECONDS PIDFILE COMMAND...: until COMMAND succeeds, the process lives, time is left
    local t=$1 pf=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)) || ! alive "$pf"; then
            return 1
        fi
        sleep 0.2
    done
}

sock_ready() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$1"; }

start_stargz() {
    local h
    {
        for h in ${STARGZ_PLAIN_HTTP//,/ }; do
            printf '[[resolver.host."%s".mirrors]]\n  host = "%s"\n  insecure = true\n' "$h" "$h"
        done
    } >"$dir/stargz.toml"
    setsid "$STARGZ_BIN_DIR/containerd-stargz-grpc" --address "$dir/stargz.sock" \
        --root "$dir/stargz" --config "$dir/stargz.toml" --log-level "${STARGZ_LOG_LEVEL:-info}" \
        >>"$dir/stargz.log" 2>&1 </dev/null &
    echo $! >"$dir/stargz.pid"
    if ! wait_for "$START_TIMEOUT" "$dir/stargz.pid" sock_ready "$dir/stargz.sock"; then
        tail -20 "$dir/stargz.log" >&2 || true
        stop_all
        die "containerd-stargz-grpc did not listen on $dir/stargz.sock (log: $dir/stargz.log)"
    fi
}

start_soci() {
    local h
    {
        # This containerd: soci reads an image's manifest from its content store to fetch
        # layers that have no zTOC itself (default /run/containerd/containerd.sock).
        printf '[content_store]\n  containerd_address = "%s"\n\n' "$csock"
        # soci parses a mirror's host as a URL (a bare host:port is not one).
        for h in ${SOCI_PLAIN_HTTP//,/ }; do
            printf '[[resolver.host."%s".mirrors]]\n  host = "http://%s"\n  insecure = true\n' "$h" "$h"
        done
    } >"$dir/soci.toml"
    setsid "$SOCI_BIN_DIR/soci-snapshotter-grpc" --address "$dir/soci.sock" \
        --root "$dir/soci" --config "$dir/soci.toml" --log-level "${SOCI_LOG_LEVEL:-info}" \
        >>"$dir/soci.log" 2>&1 </dev/null &
    echo $! >"$dir/soci.pid"
    if ! wait_for "$START_TIMEOUT" "$dir/soci.pid" sock_ready "$dir/soci.sock"; then
        tail -20 "$dir/soci.log" >&2 || true
        stop_all
        die "soci-snapshotter-grpc did not listen on $dir/soci.sock (log: $dir/soci.log)"
    fi
}

start_lazysnap() {
    local bin
    bin=$(lazysnap_bin)
    local extra=()
    read -r -a extra <<<"${LAZYSNAP_SERVE_ARGS:-}"
    LAZYSNAP_LOG=${LAZYSNAP_LOG:-info} setsid "$bin" --root "$lroot" serve --address "$lsock" \
        --containerd-content "$content" "${extra[@]}" >>"$dir/lazysnap.log" 2>&1 </dev/null &
    echo $! >"$dir/lazysnap.pid"
    if ! wait_for "$START_TIMEOUT" "$dir/lazysnap.pid" sock_ready "$lsock"; then
        tail -20 "$dir/lazysnap.log" >&2 || true
        stop_all
        die "lazysnap serve did not listen on $lsock (log: $dir/lazysnap.log)"
    fi
}

# Restarts only `lazysnap serve` (containerd's proxy client reconnects).
restart_snapshotter() {
    setup_paths
    alive "$dir/containerd.pid" || die "not running in $dir"
    stop_pid "$dir/lazysnap.pid" "lazysnap serve"
    start_lazysnap
    echo "containerd-env: lazysnap serve restarted (pid $(cat "$dir/lazysnap.pid"))"
}

start() {
    setup_paths
    command -v containerd >/dev/null || die "containerd is not installed (apt-get install containerd runc)"
    command -v runc >/dev/null || die "runc is not installed (apt-get install runc)"
    [[ $(id -u) == 0 ]] || die "must run as root"
    if alive "$dir/lazysnap.pid" || alive "$dir/containerd.pid"; then
        die "already running in $dir (stop it first)"
    fi
    mkdir -p "$croot" "$cstate" "$lroot"
    write_config
    start_lazysnap
    [[ -n ${STARGZ_BIN_DIR:-} ]] && start_stargz
    [[ -n ${SOCI_BIN_DIR:-} ]] && start_soci
    setsid containerd --config "$dir/config.toml" --log-level "${CONTAINERD_LOG_LEVEL:-info}" \
        >>"$dir/containerd.log" 2>&1 </dev/null &
    echo $! >"$dir/containerd.pid"
    if ! wait_for "$START_TIMEOUT" "$dir/containerd.pid" ctr -a "$csock" version; then
        tail -20 "$dir/containerd.log" >&2 || true
        stop_all
        die "containerd did not answer on $csock (log: $dir/containerd.log)"
    fi
    # Read the whole list first: `grep -q` closing the pipe early would fail it under pipefail.
    local plugins
    plugins=$(ctr -a "$csock" plugins ls 2>/dev/null || true)
    if ! grep -Eq 'snapshotter\.v1 +lazysnap +.* ok' <<<"$plugins"; then
        echo "$plugins" >&2
        stop_all
        die "containerd did not load the lazysnap snapshotter"
    fi
    if [[ -n ${EROFS_BIN_DIR:-} ]] && ! grep -Eq 'differ\.v1 +erofs +.* ok' <<<"$plugins"; then
        grep -E 'erofs' <<<"$plugins" >&2 || true
        grep -E 'erofs' "$dir/containerd.log" | tail -5 >&2 || true
        stop_all
        die "containerd did not load the erofs differ (EROFS_BIN_DIR=$EROFS_BIN_DIR)"
    fi
    echo "containerd-env: running in $dir (containerd pid $(cat "$dir/containerd.pid"), lazysnap pid $(cat "$dir/lazysnap.pid"))"
    print_env
}

# SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL.
stop_pid() { # PIDFILE NAME
    local pf=$1 name=$2
    [[ -f $pf ]] || return 0
    local pid
    pid=$(cat "$pf")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local end=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= end)); then
                echo "containerd-env: $name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    fi
    rm -f "$pf"
}

# Mounts under DIR, deepest first (container rootfs, containerd's temp mounts, FUSE mounts).
unmount_leftovers() {
    local m
    awk -v d="$dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
        m=$(printf '%b' "$m")  # mountinfo escapes spaces as \040
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "containerd-env: could not unmount $m" >&2
    done
}

# Loop devices backing files under DIR (the erofs snapshotter's layer images; containerd
# detaches them at unmount, this is for a killed containerd).
detach_loops() {
    local dev file
    losetup -n -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
        case $file in "$dir"/*) losetup -d "$dev" 2>/dev/null || true ;; esac
    done
}

stop_shims() {
    # runc shims of this containerd (their -address names our socket) outlive it by design.
    local pid
    for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $csock( |$)" || true); do
        kill -TERM "$pid" 2>/dev/null || true
    done
}

stop_all() {
    stop_pid "$dir/containerd.pid" containerd
    stop_shims
    stop_pid "$dir/lazysnap.pid" "lazysnap serve"
    stop_pid "$dir/stargz.pid" containerd-stargz-grpc
    stop_pid "$dir/soci.pid" soci-snapshotter-grpc
    unmount_leftovers
    detach_loops
}

stop() {
    setup_paths
    stop_all
    rm -f "$csock" "$csock.ttrpc" "$lsock"
    echo "containerd-env: stopped ($dir)"
}

print_env() {
    echo "export CONTAINERD_ADDRESS=$csock"
    echo "export CONTAINERD_SNAPSHOTTER=lazysnap"
    echo "export LAZYSNAP_SOCK=$lsock"
    echo "export LAZYSNAP_ROOT=$lroot"
    echo "export CONTAINERD_CONTENT=$content"
}

status() {
    setup_paths
    alive "$dir/containerd.pid" && echo "containerd: running (pid $(cat "$dir/containerd.pid"))" || echo "containerd: stopped"
    alive "$dir/lazysnap.pid" && echo "lazysnap: running (pid $(cat "$dir/lazysnap.pid"))" || echo "lazysnap: stopped"
}

# tools/rpull, built (Go, GOPATH mode against Debian's containerd sources) when missing or
# older than its source: $RPULL_BIN, else target/go/rpull.
rpull_bin() {
    if [[ -n ${RPULL_BIN:-} ]]; then echo "$RPULL_BIN"; return; fi
    local bin=$here/target/go/rpull src=$here/tools/rpull/main.go
    if [[ ! -x $bin || $src -nt $bin ]]; then
        command -v go >/dev/null || die "go is not installed (apt-get install golang-go golang-github-containerd-containerd-dev)"
        mkdir -p "$here/target/go"
        (cd "$here" && GO111MODULE=off GOPATH=${GOPATH:-/usr/share/gocode} GOFLAGS= \
            GOCACHE=${GOCACHE:-$here/target/go-build-cache} go build -o "$bin" ./tools/rpull) >&2 \
            || die "building tools/rpull failed"
    fi
    echo "$bin"
}

rpull() {
    setup_paths
    alive "$dir/containerd.pid" || die "not running in $dir"
    local bin
    bin=$(rpull_bin)
    "$bin" -a "$csock" -n "${CONTAINERD_NAMESPACE:-default}" -snapshotter lazysnap "$ref"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    env) setup_paths; print_env ;;
    status) status ;;
    restart-snapshotter) restart_snapshotter ;;
    rpull) rpull ;;
    *) die "usage: $0 start|stop|env|status|restart-snapshotter [DIR] | rpull REF [DIR]" ;;
esac
