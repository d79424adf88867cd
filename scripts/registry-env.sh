#!/usr/bin/env bash
# A private OCI registry for tests and demos: Debian's docker-registry (distribution 2.8) on
# 127.0.0.1 with a free port, storage under DIR. Plain HTTP (loopback; lazysnap, like docker,
# uses HTTP for loopback registries).
#
#   scripts/registry-env.sh start DIR [USER:PASSWORD]   # prints 127.0.0.1:PORT (also DIR/addr)
#   scripts/registry-env.sh stop DIR
#
# With USER:PASSWORD the registry requires HTTP Basic auth (htpasswd, bcrypt). The Bearer
# token flow is tested through scripts/registry-proxy.py --bearer in front of a registry (the
# registry's own `auth: token` needs a JWT-issuing token server, which Debian does not ship).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[[ -n $cmd && -n $dir ]] || { echo "usage: $0 start|stop DIR [USER:PASSWORD]" >&2; exit 2; }

stop() {
  if [[ -f $dir/registry.pid ]]; then
    pid=$(cat "$dir/registry.pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/registry.pid"
  fi
}

start_once() {
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  auth=""
  if [[ -n ${1:-} ]]; then
    command -v htpasswd >/dev/null || { echo "htpasswd missing (apache2-utils)" >&2; exit 1; }
    htpasswd -Bbn "${1%%:*}" "${1#*:}" > "$dir/htpasswd"
    auth="auth:
  htpasswd:
    realm: lazysnap-test
    path: $dir/htpasswd"
  fi
  cat > "$dir/config.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
$auth
YAML
  nohup docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  echo $! > "$dir/registry.pid"
  for _ in $(seq 100); do
    code=$(python3 - "$port" <<'PY' 2>/dev/null || true
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
)
    if [[ $code == 200 || $code == 401 ]]; then
      echo "127.0.0.1:$port" > "$dir/addr"
      echo "127.0.0.1:$port"
      return 0
    fi
    kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

case $cmd in
start)
  command -v docker-registry >/dev/null || { echo "docker-registry missing (scripts/install-deps.sh)" >&2; exit 1; }
  mkdir -p "$dir/data"
  dir=$(cd "$dir" && pwd)
  stop
  # A free port is picked, then bound by the registry: another process may take it in
  # between, so a failed start is tried again on a new port.
  for _attempt in 1 2 3; do
    if start_once "${3:-}"; then
      exit 0
    fi
    stop
  done
  echo "registry did not start; log:" >&2
  cat "$dir/registry.log" >&2
  stop
  exit 1
  ;;
stop) stop ;;
*) echo "usage: $0 start|stop DIR [USER:PASSWORD]" >&2; exit 2 ;;
esac
