#!/usr/bin/env python3
"""A fault-injecting, token-issuing HTTP proxy in front of a registry, for tests.

    registry-proxy.py UPSTREAM [--cut-after N] [--corrupt] [--fail-first N [--fail-status S]]
                      [--bearer [USER:PASS]] [--no-ranges] [--log FILE]
                      [--rate BYTES_PER_SEC [--burst BYTES]] [--latency MS]

Prints the port it listens on (127.0.0.1) as its first line, then serves until killed.

--cut-after N   the first GET of each blob sends the full Content-Length but only N bytes of
                the body, then drops the connection (a client must resume from byte N)
--corrupt       flips one byte in the middle of every blob body over 64 KiB (the layers, not
                the config: the digest check of a streamed layer must fail)
--bearer        imitates distribution's token auth: requests without a valid Bearer token get
                401 + `WWW-Authenticate: Bearer realm=".../token",service=...,scope=...`;
                GET /token issues a random token (anonymously, or only to USER:PASS by HTTP
                Basic when given). Tokens are checked here; the upstream registry is open.
--fail-first N  answers the first N blob GETs with --fail-status (default 503; 429 sends
                Retry-After: 1): a client must back off and retry
--cut-ranges    the first answer to each distinct Range request of a blob sends half its body,
                then drops the connection (a lazy read must ask again)
--corrupt-ranges  flips one byte of the first answer to each distinct Range request of a blob
                (a lazy read must notice by the chunk's sha256 and ask again)
--no-ranges     drops Range headers (a registry that always answers 200 with the whole blob)
--log FILE      appends one line per request: METHOD PATH RANGE-HEADER
--rate R        one bandwidth limit shared by all connections (like one network link): response
                bodies go out in pieces of at most 64 KiB, each waiting for its bytes in a token
                bucket filled at R bytes/s (suffixes k, M, G are powers of 1000: 10M = 10 MB/s);
                the proxy's send buffer per connection is kept small (256 KiB) so a client that
                stops reading stops taking the link. --burst B: the bucket's size (default 20 ms
                of R, at least 64 KiB: a sender that overslept catches up)
--latency MS    waits MS milliseconds before forwarding each request (a round trip to a
                distant registry)

GET /_proxy/stats answers (not forwarded, logged, throttled or authenticated) the counters so far:
{"requests", "bytes" (response body bytes sent), "blob_gets", "blob_bytes" (200 answers to
blob GETs), "range_gets", "range_bytes" (206 answers)}.
"""
import argparse
import base64
import http.client
import http.server
import json
import re
import secrets
import socket
import sys
import threading
import time

args = None
tokens = set()
cut_done = set()
range_cut = set()
range_corrupt = set()
failed = [0]
lock = threading.Lock()
stats = {"requests": 0, "bytes": 0, "blob_gets": 0, "blob_bytes": 0, "range_gets": 0,
         "range_bytes": 0}
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-authenticate"}


class Bucket:
    """A token bucket shared by every connection: `take(n)` returns once n bytes may go out.
    Debt is allowed (tokens go negative), so concurrent senders are served in the order they
    asked, each piece waiting for the bytes reserved before it."""

    def __init__(self, rate, burst):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self.t = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n):
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            self.tokens -= n
            wait = -self.tokens / self.rate
        if wait > 0:
            time.sleep(wait)


bucket = None
PIECE = 65536


def parse_rate(s):
    m = re.fullmatch(r"([0-9.]+)([kKMG]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {s!r} (e.g. 10M)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        if bucket is not None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)

    def log_message(self, fmt, *a):
        pass

    def send_body(self, data):
        """Writes response body bytes through the shared bucket (when throttled)."""
        if bucket is None:
            self.wfile.write(data)
        else:
            for i in range(0, len(data), PIECE):
                piece = data[i:i + PIECE]
                bucket.take(len(piece))
                self.wfile.write(piece)
        with lock:
            stats["bytes"] += len(data)

    def log_request_line(self):
        if args.log:
            with lock, open(args.log, "a") as f:
                f.write(f"{self.command} {self.path} {self.headers.get('Range', '-')}\n")

    def send_json(self, code, obj, extra=()):
        body = json.dumps(obj).encode()
        self.send_response(code)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.send_body(body)

    def token(self):
        if args.bearer and ":" in args.bearer:
            want = "Basic " + base64.b64encode(args.bearer.encode()).decode()
            if self.headers.get("Authorization") != want:
                return self.send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                                      [("WWW-Authenticate", 'Basic realm="token"')])
        t = secrets.token_hex(16)
        with lock:
            tokens.add(t)
        self.send_json(200, {"token": t, "access_token": t, "expires_in": 300})

    def authorized(self):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in tokens:
            return True
        m = re.match(r"^/v2/(.+?)/(manifests|blobs|tags)/", self.path)
        action = "pull" if self.command in ("GET", "HEAD") else "pull,push"
        scope = f',scope="repository:{m.group(1)}:{action}"' if m else ""
        host = self.headers.get("Host", f"127.0.0.1:{self.server.server_port}")
        self.send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]}, [(
            "WWW-Authenticate",
            f'Bearer realm="http://{host}/token",service="lazysnap-test"{scope}')])
        return False

    def handle_any(self):
        if self.path == "/_proxy/stats":
            with lock:
                body = json.dumps(stats).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        self.log_request_line()
        with lock:
            stats["requests"] += 1
        if args.latency:
            time.sleep(args.latency / 1000)
        if args.bearer is not None:
            if self.path.startswith("/token"):
                return self.token()
            if not self.authorized():
                return
        if args.fail_first and self.command == "GET" and "/blobs/sha256:" in self.path:
            with lock:
                fail = failed[0] < args.fail_first
                failed[0] += 1
            if fail:
                extra = [("Retry-After", "1")] if args.fail_status == 429 else []
                return self.send_json(args.fail_status, {"errors": [{"code": "UNAVAILABLE"}]}, extra)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        # Repeated headers (skopeo sends one Accept per media type) are joined, not dropped.
        headers = {}
        for k, v in self.headers.items():
            k = k.lower()
            if k in HOP or k in ("host", "authorization") or (args.no_ranges and k == "range"):
                continue
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        conn = http.client.HTTPConnection(args.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        is_blob = self.command == "GET" and "/blobs/sha256:" in self.path and resp.status in (200, 206)
        kind = ("range" if resp.status == 206 else "blob") if is_blob else None
        if kind:
            with lock:
                stats[kind + "_gets"] += 1
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in HOP:
                continue
            if k.lower() == "location":
                v = v.replace(f"http://{args.upstream}", f"http://{self.headers.get('Host')}")
            self.send_header(k, v)
        if resp.getheader("Content-Length") is None and self.command != "HEAD":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = None
        if is_blob and args.cut_after is not None and resp.status == 200:
            with lock:
                if self.path not in cut_done:
                    cut_done.add(self.path)
                    cut = args.cut_after
        total = int(resp.getheader("Content-Length") or 0)
        flip = total // 2 if (is_blob and args.corrupt and resp.status == 200 and total > 65536) else None
        if is_blob and resp.status == 206 and total > 1:
            key = (self.path, self.headers.get("Range"))
            with lock:
                if args.cut_ranges and key not in range_cut:
                    range_cut.add(key)
                    cut = total // 2
                elif args.corrupt_ranges and key not in range_corrupt:
                    range_corrupt.add(key)
                    flip = total // 2
        sent = 0
        while True:
            chunk = resp.read(65536)
            if not chunk:
                break
            if flip is not None and sent <= flip < sent + len(chunk):
                b = bytearray(chunk)
                b[flip - sent] ^= 0xFF
                chunk = bytes(b)
            if kind:
                n = len(chunk) if cut is None else min(len(chunk), cut - sent)
                with lock:
                    stats[kind + "_bytes"] += n
            if cut is not None and sent + len(chunk) >= cut:
                self.send_body(chunk[: cut - sent])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                conn.close()
                return
            self.send_body(chunk)
            sent += len(chunk)
        conn.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients dropping pooled connections at exit are not errors worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("upstream")
    p.add_argument("--cut-after", type=int)
    p.add_argument("--corrupt", action="store_true")
    p.add_argument("--bearer", nargs="?", const="")
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=503)
    p.add_argument("--no-ranges", action="store_true")
    p.add_argument("--cut-ranges", action="store_true")
    p.add_argument("--corrupt-ranges", action="store_true")
    p.add_argument("--log")
    p.add_argument("--rate", type=parse_rate)
    p.add_argument("--burst", type=parse_rate)
    p.add_argument("--latency", type=float, default=0)
    args = p.parse_args()
    global bucket
    if args.rate:
        bucket = Bucket(args.rate, max(args.burst or args.rate // 50, PIECE))
    srv = Server(("127.0.0.1", 0), Handler)
    print(srv.server_port, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
