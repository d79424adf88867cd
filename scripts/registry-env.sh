#!/usr/bin/env bash
# A private OCI registry for tests and demos: Debian's docker-registry (distribution 2.8) on
# 127.0.0.1 with a free port, storage under DIR. Plain HTTP (loopback; lazysnap, like docker,
# uses HTTP for loopback registries).
#
#   scripts/registry-env.sh start DIR [USER:PASSWORD]   # prints 127.0.0.1:PORT (also DIR/addr)
#   scripts/registry-env.sh stop DIR
#
# With USER:PASSWORD the registry requires HTTP Basic auth (htpasswd, bcrypt). With TLS=1 it
# serves HTTPS with a certificate (for 127.0.0.1) signed by a CA made here with openssl; the
# CA is put where docker (and lazysnap, through LAZYSNAP_CERTS_D) looks for a registry's CA:
# DIR/certs.d/127.0.0.1:PORT/ca.crt. The Bearer
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

# A CA and a server certificate for 127.0.0.1/localhost (once per DIR).
make_certs() {
  [[ -f $dir/tls/server.crt ]] && return 0
  mkdir -p "$dir/tls"
  (
    cd "$dir/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=lazysnap test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 \
      -extfile ext.cnf -out server.crt 2>/dev/null
  )
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
  scheme=http
  tls=""
  if [[ ${TLS:-0} == 1 ]]; then
    scheme=https
    make_certs
    tls="  tls:
    certificate: $dir/tls/server.crt
    key: $dir/tls/server.key"
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
$tls
$auth
YAML
  nohup docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  echo $! > "$dir/registry.pid"
  for _ in $(seq 100); do
    code=$(python3 - "$port" "$scheme" "$dir/tls/ca.crt" <<'PY' 2>/dev/null || true
import ssl, sys, urllib.request, urllib.error
port, scheme, ca = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca) if scheme == "https" else None
try:
    print(urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/v2/", timeout=1, context=ctx).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
)
    if [[ $code == 200 || $code == 401 ]]; then
      if [[ $scheme == https ]]; then
        mkdir -p "$dir/certs.d/127.0.0.1:$port"
        cp "$dir/tls/ca.crt" "$dir/certs.d/127.0.0.1:$port/ca.crt"
      fi
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
