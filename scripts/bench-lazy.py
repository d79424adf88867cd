#!/usr/bin/env python3
"""Time to the first `ls` of an image and to running a program from it, through a registry
throttled to 10 and 100 MB/s (issue #9 item 4): lazy pull vs full pull vs download + `tar -x`.

    scripts/bench-lazy.py             # as root; medians to stdout, bench/lazy-results.{md,json}
    ROUNDS=5 RATES=10,100 IMAGES=debian-gzip,big-gzip scripts/bench-lazy.py
    scripts/bench-lazy.py --report    # the tables again from bench/lazy-results.json
    LAZYSNAP=path/to/lazysnap SCENARIOS=lazy,tar LATENCY=20 OUT_DIR=/tmp scripts/bench-lazy.py

Each rate (MB/s, 10^6 bytes) is one token bucket shared by all connections of
scripts/registry-proxy.py (`--rate`), in front of Debian's docker-registry on 127.0.0.1
(scripts/registry-env.sh); LATENCY=MS adds a delay before each request (default 0). Per rate,
round and image, in a fresh root / directory, the page cache dropped before every step
(`sync; echo 3 > /proc/sys/vm/drop_caches`), the scenarios (order rotated each round):

  lazy        `pull --lazy` + `mount` + `ls MNT`  ->  first ls;  then `chroot MNT PROGRAM`
  lazy+trace  the same from a repository whose index artifact carries the access trace a
              first lazy run of the image recorded (`index push` again): the pull keeps the
              trace, and the mount fetches the traced ranges first thing, in parallel and in
              order of first need, while `ls` and the program run (their reads fetch too)
  lazy+trace-wait  the same with `pull --lazy --prefetch`, which fetches the traced ranges
              before returning (the behaviour before the mount prefetched; not run by default)
  lazy-nobg   `pull --lazy --no-background-fetch` (reads only; nothing competes with them)
  full        `pull` (whole layers) + `mount` + `ls`; then the program
  tar         `skopeo copy docker://… oci:DIR` + `tar -x` of each layer in order + `ls`; then the
              program in a chroot of the extracted tree (the peer: what a plain pull does)

Time to first ls is the sum of the steps before it; time to program done adds the program.
Bytes are response bodies through the proxy since the scenario began (manifests, index
artifacts, ranges and background downloads alike); `ranges` counts 206 answers.

Images (IMAGES=…): debian-gzip (target/testdata, scripts/make-test-images.sh: ~97 MB in 3
layers), big-gzip (bench/data, scripts/bench.d/make-bench-images.sh: ~360 MB in 3 layers), and
debian-zstd4m / big-zstd4m, the same layers as zstd in 4 MiB frames (made here with
scripts/mkimage.py into bench/data/lazy-images: seekable, so lazily readable); on request
debian-zstd (one zstd frame per layer: not lazily readable, so `pull --lazy` downloads it).
Offline: everything is made from cached Debian packages. The work directory bench/work/lazy is
recreated each run; the registry, proxy and mounts are gone when it ends.
"""
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TESTDATA = os.environ.get("LAZYSNAP_TESTDATA", f"{REPO}/target/testdata")
BENCH_DATA = os.environ.get("BENCH_DATA", f"{REPO}/bench/data")
WORK = f"{REPO}/bench/work/lazy"  # recreated each run
OUT = os.environ.get("OUT_DIR", f"{REPO}/bench")  # where lazy-results.{md,json} go

ROUNDS = int(os.environ.get("ROUNDS", "3"))
RATES = [float(r) for r in os.environ.get("RATES", "10,100").split(",")]
IMAGES = os.environ.get("IMAGES", "debian-gzip,debian-zstd4m,big-gzip,big-zstd4m").split(",")
ALL_SCENARIOS = ["lazy", "lazy+trace", "lazy+trace-wait", "lazy-nobg", "full", "tar"]
DEFAULT_SCENARIOS = ["lazy", "lazy+trace", "lazy-nobg", "full", "tar"]
SCENARIOS = os.environ.get("SCENARIOS", ",".join(DEFAULT_SCENARIOS)).split(",")
LATENCY = float(os.environ.get("LATENCY", "0"))
# Starts the interpreter, imports a good part of the standard library (~2k files' worth of
# lookups, a few MB of .py/.pyc/.so besides libpython and libc) and touches sqlite3's library.
PROGRAM = os.environ.get("PROGRAM", (
    "python3 -c 'import asyncio, email.mime.multipart, http.server, xml.dom.minidom, decimal, "
    "sqlite3, unittest, argparse, logging.handlers, tarfile, zipfile, csv, ssl, "
    "multiprocessing, concurrent.futures, urllib.request, pydoc; "
    "print(sqlite3.connect(\":memory:\").execute(\"select 1\").fetchone()[0])'"))

IMAGE_SOURCES = {
    "debian-gzip": ("testdata", "debian-gzip"),
    "debian-zstd": ("testdata", "debian-zstd"),
    "debian-zstd4m": ("build", [f"{TESTDATA}/debian-layers/layer{i}.tar" for i in (1, 2, 3)]),
    "big-gzip": ("benchdata", "big-gzip"),
    "huge-gzip": ("benchdata", "huge-gzip"),  # scripts/bench.d/make-huge-image.sh
    "big-zstd4m": ("build", [f"{BENCH_DATA}/layers/big{i}.tar" for i in (1, 2, 3)]),
}

LAZYSNAP = None
PROXY = None  # (Popen, "127.0.0.1:PORT")


def log(*a):
    print("[bench-lazy %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def run(cmd, capture=False, **kw):
    r = subprocess.run(cmd, check=True, text=True,
                       stdout=subprocess.PIPE if capture else subprocess.DEVNULL, **kw)
    return r.stdout if capture else None


def lz(root, *args, capture=False):
    return run([LAZYSNAP, "--root", root, *args], capture=capture)


def drop():
    """Flushes and drops the page cache; returns the seconds it took (outside the timings)."""
    t = time.perf_counter()
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    return time.perf_counter() - t


def timed(fn, *a, **kw):
    t = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t


def rmtree(p):
    if os.path.lexists(p):
        subprocess.run(["rm", "-rf", "--one-file-system", p], check=False)


def umount_all_under(top):
    """Unmounts every mount below `top` (deepest first)."""
    for _ in range(3):
        mounts = [l.split()[4] for l in open("/proc/self/mountinfo")]
        under = sorted((m for m in mounts if m.startswith(top + "/")), key=len, reverse=True)
        if not under:
            return
        for m in under:
            if subprocess.run(["umount", m], stderr=subprocess.DEVNULL).returncode != 0:
                subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        time.sleep(0.2)


def pids_naming(needle):
    """PIDs of processes with `needle` in an argument (the mount daemons of one root)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            args = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(needle.encode() in a for a in args):
            out.append(int(d))
    return out


def umount(root, mnt):
    """`lazysnap umount`, then waits for the root's mount daemon to exit (its background
    download stops with it), killing it after 10 s."""
    subprocess.run([LAZYSNAP, "--root", root, "umount", mnt], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    end = time.time() + 10
    while True:
        pids = pids_naming(root)
        if not pids:
            return
        if time.time() > end:
            for p in pids:
                os.kill(p, signal.SIGKILL)
            log(f"killed the mount daemon(s) {pids} of {root}")
            return
        time.sleep(0.05)


def layout_layers(layout):
    """(path, media type) of the layers of the single image in an OCI layout, in order."""
    def blob(d):
        a, h = d.split(":", 1)
        return os.path.join(layout, "blobs", a, h)
    idx = json.load(open(os.path.join(layout, "index.json")))
    m = json.load(open(blob(idx["manifests"][0]["digest"])))
    return [(blob(l["digest"]), l["mediaType"]) for l in m["layers"]]


# ---------------------------------------------------------------- the throttled registry

def start_proxy(upstream, rate_mb):
    global PROXY
    stop_proxy()
    cmd = ["python3", f"{HERE}/registry-proxy.py", upstream, "--rate", str(int(rate_mb * 1e6))]
    if LATENCY:
        cmd += ["--latency", str(LATENCY)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    port = p.stdout.readline().strip()
    PROXY = (p, f"127.0.0.1:{port}")
    return PROXY[1]


def stop_proxy():
    global PROXY
    if PROXY:
        PROXY[0].terminate()
        PROXY[0].wait()
        PROXY = None


def proxy_stats():
    with urllib.request.urlopen(f"http://{PROXY[1]}/_proxy/stats", timeout=10) as r:
        return json.load(r)


# ---------------------------------------------------------------- images and setup

def ensure_images():
    """Path of each requested image's OCI layout (built or made here when missing)."""
    if any(i.startswith("debian") for i in IMAGES):
        run(["bash", f"{HERE}/make-test-images.sh", TESTDATA], stderr=subprocess.DEVNULL)
    if any(i.startswith(("big", "huge")) for i in IMAGES):
        run(["bash", f"{HERE}/bench.d/make-bench-images.sh", BENCH_DATA])
    if "huge-gzip" in IMAGES:
        run(["bash", f"{HERE}/bench.d/make-huge-image.sh", BENCH_DATA])
    out = {}
    for img in IMAGES:
        kind, what = IMAGE_SOURCES[img]
        if kind == "testdata":
            out[img] = f"{TESTDATA}/{what}"
        elif kind == "benchdata":
            out[img] = f"{BENCH_DATA}/{what}"
        else:
            dest = f"{REPO}/bench/data/lazy-images/{img}"
            if not os.path.isfile(f"{dest}/index.json"):
                log(f"making {img} (zstd, 4 MiB frames)")
                rmtree(dest)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                run(["python3", f"{HERE}/mkimage.py", dest + ".tmp", *what,
                     "--compression", "zstd-multi", "--chunk", "4"])
                os.rename(dest + ".tmp", dest)
            out[img] = dest
    return out


def setup_image(addr, img, layout):
    """Pushes the image to two repositories with index artifacts: lazy/IMG (no trace) and
    lazy/IMG-traced (the trace of a first lazy run). Returns (plain ref, traced ref, trace)."""
    plain, traced = f"{addr}/lazy/{img}:latest", f"{addr}/lazy/{img}-traced:latest"
    for ref in (plain, traced):
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
             f"docker://{ref}"])
    seed = f"{WORK}/seed/{img}"
    lz(seed, "pull", plain)
    lz(seed, "index", "push", plain)
    # A first lazy run (unthrottled, reads only) records the access trace.
    tr, mnt = f"{WORK}/trace-run/{img}", f"{WORK}/trace-run/{img}-mnt"
    os.makedirs(mnt, exist_ok=True)
    lz(tr, "pull", "--lazy", "--no-background-fetch", plain)
    lz(tr, "mount", plain, mnt)
    run(["ls", mnt])
    run(["chroot", mnt, "/bin/bash", "-c", PROGRAM])
    time.sleep(2.5)  # the recorder writes its trace every second
    umount(tr, mnt)
    traces = sorted(os.listdir(f"{tr}/traces")) if os.path.isdir(f"{tr}/traces") else []
    for t in traces:
        os.makedirs(f"{seed}/traces", exist_ok=True)
        shutil.copy(f"{tr}/traces/{t}", f"{seed}/traces/{t}")
    lz(seed, "index", "push", traced, "--name", plain)
    layers = json.loads(lz(tr, "trace", "--json", plain, capture=True))
    rmtree(tr)
    rmtree(mnt)
    # What the program read: files and bytes (from each file's start to its furthest read).
    return plain, traced, {"layers": len(layers),
                           "files": sum(len(l["reads"]) for l in layers),
                           "read_bytes": sum(r["read_end"] for l in layers for r in l["reads"]),
                           "per_layer": [{"layer": l["layer"], "files": len(l["reads"]),
                                          "read_bytes": sum(r["read_end"] for r in l["reads"])}
                                         for l in layers]}


# ---------------------------------------------------------------- scenarios

def program_ok(rootfs):
    out = run(["chroot", rootfs, "/bin/bash", "-c", PROGRAM], capture=True)
    if out.strip() != "1":
        raise RuntimeError(f"program printed {out!r} in {rootfs}")


def scenario_lazysnap(name, ref, d):
    """pull (lazy or not) + mount + ls, then the program. Returns the sample."""
    root, mnt = f"{d}/root", f"{d}/mnt"
    os.makedirs(mnt)
    s = {"drops": []}
    b0 = proxy_stats()
    pull = ["pull", ref]
    if name.startswith("lazy"):
        pull.insert(1, "--lazy")
    if name == "lazy-nobg":
        pull.insert(2, "--no-background-fetch")
    if name == "lazy+trace-wait":
        pull.insert(2, "--prefetch")
    s["drops"].append(drop())
    t = time.perf_counter()
    s["pull_out"] = lz(root, *pull, capture=True).strip()
    s["pull"] = time.perf_counter() - t
    # Only `pull --prefetch` says what it prefetched (a mount's prefetch runs in its daemon).
    m = re.search(r"(\S+ \S+) prefetched for the recorded", s["pull_out"])
    s["prefetched"] = m.group(1) if m else None
    s["drops"].append(drop())
    s["mount"] = timed(lz, root, "mount", ref, mnt)
    s["drops"].append(drop())
    s["ls"] = timed(run, ["ls", mnt])
    b1 = proxy_stats()
    s["drops"].append(drop())
    s["program"] = timed(program_ok, mnt)
    b2 = proxy_stats()
    umount(root, mnt)
    s["first_ls"] = s["pull"] + s["mount"] + s["ls"]
    s["done"] = s["first_ls"] + s["program"]
    s["bytes_ls"] = b1["bytes"] - b0["bytes"]
    s["bytes_done"] = b2["bytes"] - b0["bytes"]
    s["ranges_done"] = b2["range_gets"] - b0["range_gets"]
    s["range_bytes_done"] = b2["range_bytes"] - b0["range_bytes"]
    return s


def scenario_tar(ref, d):
    """skopeo copy + tar -x of every layer in order + ls, then the program in a chroot."""
    layout, rootfs = f"{d}/oci", f"{d}/rootfs"
    os.makedirs(rootfs)
    s = {"drops": []}
    b0 = proxy_stats()
    s["drops"].append(drop())
    s["download"] = timed(run, ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                                f"docker://{ref}", f"oci:{layout}:latest"])
    s["drops"].append(drop())

    def extract():
        # Without --recursive-unlink: that option empties an existing directory when a later
        # layer lists it again. A layer replacing a directory by a file fails that one entry
        # (tar goes on and exits 2); whiteouts stay as files. Neither matters for timing.
        errors = []
        for path, media in layout_layers(layout):
            flag = {"zstd": ["--zstd"], "gzip": ["-z"]}.get(media.rsplit("+", 1)[-1], [])
            r = subprocess.run(["tar", *flag, "--warning=no-unknown-keyword", "-xf", path, "-C",
                                rootfs], stderr=subprocess.PIPE, text=True)
            lines = [l for l in r.stderr.splitlines() if "Exiting with failure" not in l]
            if r.returncode not in (0, 2) or (r.returncode == 2 and not lines):
                raise RuntimeError(f"tar -x {path}: exit {r.returncode}: {r.stderr}")
            errors += lines
        s["tar_errors"] = errors
    s["extract"] = timed(extract)
    s["drops"].append(drop())
    s["ls"] = timed(run, ["ls", rootfs])
    b1 = proxy_stats()
    s["drops"].append(drop())
    s["program"] = timed(program_ok, rootfs)
    b2 = proxy_stats()
    s["first_ls"] = s["download"] + s["extract"] + s["ls"]
    s["done"] = s["first_ls"] + s["program"]
    s["bytes_ls"] = b1["bytes"] - b0["bytes"]
    s["bytes_done"] = b2["bytes"] - b0["bytes"]
    s["ranges_done"] = b2["range_gets"] - b0["range_gets"]
    s["range_bytes_done"] = b2["range_bytes"] - b0["range_bytes"]
    return s


# ---------------------------------------------------------------- report

def med(samples, key):
    v = [s[key] for s in samples if key in s]
    return statistics.median(v) if v else None


def mb(b):
    return b / 1e6


def report(samples, info):
    results = {}
    for s in samples:
        key = f"{s['rate']:g}/{s['image']}"
        results.setdefault(key, {}).setdefault(s["scenario"], []).append(s)
    lines = []
    head = ("| scenario | first ls (s) | program done (s) | MB by first ls | MB by done "
            "| range requests | ls ×tar | done ×tar |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    for rate in info["rates_MBps"]:
        for img in info["images"]:
            rows = results.get(f"{rate:g}/{img}")
            if not rows:
                continue
            i = info["images"][img]
            lines.append(f"\n### {img} at {rate:g} MB/s\n")
            lines.append(f"{i['layers']} layers, {mb(i['compressed']):.1f} MB compressed; the "
                         f"program reads {i['trace']['files']} files, "
                         f"{mb(i['trace']['read_bytes']):.1f} MB (uncompressed, from the trace)\n")
            lines.append(head)
            lines.append(sep)
            tar_ls = med(rows.get("tar", []), "first_ls")
            tar_done = med(rows.get("tar", []), "done")
            for sc in info["scenarios"]:
                ss = rows.get(sc)
                if not ss:
                    continue
                ls, done = med(ss, "first_ls"), med(ss, "done")
                r_ls = f"{ls / tar_ls:.2f}" if tar_ls else "–"
                r_done = f"{done / tar_done:.2f}" if tar_done else "–"
                lines.append(f"| {sc} | {ls:.2f} | {done:.2f} | {mb(med(ss, 'bytes_ls')):.1f} | "
                             f"{mb(med(ss, 'bytes_done')):.1f} | {med(ss, 'ranges_done'):.0f} | "
                             f"{r_ls} | {r_done} |")
            steps = []
            for sc in info["scenarios"]:
                ss = rows.get(sc)
                if not ss:
                    continue
                keys = ("download", "extract", "ls", "program") if sc == "tar" else (
                    "pull", "mount", "ls", "program")
                steps.append(f"{sc}: " + ", ".join(f"{k} {med(ss, k):.2f}" for k in keys))
            lines.append("\nsteps (median s): " + "; ".join(steps))
    return "\n".join(lines)


def main():
    global LAZYSNAP
    if sys.argv[1:] == ["--report"]:
        # The tables again from the last run's samples (bench/lazy-results.json).
        data = json.load(open(f"{OUT}/lazy-results.json"))
        return write_report(data["info"], data["samples"])
    if os.geteuid() != 0:
        sys.exit("bench-lazy: needs root (drop_caches, mounts, chroot)")
    for s in SCENARIOS:
        if s not in ALL_SCENARIOS:
            sys.exit(f"bench-lazy: unknown scenario {s} (one of {', '.join(ALL_SCENARIOS)})")
    for img in IMAGES:
        if img not in IMAGE_SOURCES:
            sys.exit(f"bench-lazy: unknown image {img} (one of {', '.join(IMAGE_SOURCES)})")
    src = os.environ.get("LAZYSNAP") or f"{REPO}/target/release/lazysnap"
    if not os.path.exists(src):
        sys.exit(f"bench-lazy: {src} missing (cargo build --release, or LAZYSNAP=…)")
    umount_all_under(WORK)
    rmtree(WORK)
    os.makedirs(WORK)
    # A private copy: a build must not swap the binary in the middle of a run.
    LAZYSNAP = f"{WORK}/lazysnap"
    shutil.copy(src, LAZYSNAP)
    layouts = ensure_images()
    # The binary is built from the last commit that changed the code (scripts change apart).
    commit = subprocess.run(["git", "-C", REPO, "log", "-1", "--format=%h", "--", "src", "fuse",
                             "Cargo.toml", "Cargo.lock", "build.rs", "proto"],
                            capture_output=True, text=True).stdout.strip()
    info = {"lazysnap": commit, "rounds": ROUNDS, "rates_MBps": RATES, "latency_ms": LATENCY,
            "program": PROGRAM, "nproc": os.cpu_count(), "kernel": os.uname().release,
            "scenarios": SCENARIOS, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "images": {}, "loadavg": []}
    reg = f"{WORK}/registry"
    addr = run(["bash", f"{HERE}/registry-env.sh", "start", reg], capture=True).strip()
    log(f"registry {addr}; lazysnap {commit}; {ROUNDS} rounds; rates {RATES} MB/s; images {IMAGES}")
    samples = []
    try:
        refs = {}
        for img in IMAGES:
            plain, traced, trace = setup_image(addr, img, layouts[img])
            layers = layout_layers(layouts[img])
            info["images"][img] = {"layers": len(layers), "trace": trace,
                                   "compressed": sum(os.path.getsize(p) for p, _ in layers)}
            refs[img] = (plain, traced)
            log(f"{img}: pushed with index artifacts; trace of {trace['files']} files")
        for rate in RATES:
            proxy = start_proxy(addr, rate)
            for rnd in range(ROUNDS):
                info["loadavg"].append(os.getloadavg()[0])
                for img in IMAGES:
                    plain, traced = refs[img]
                    order = SCENARIOS[rnd % len(SCENARIOS):] + SCENARIOS[:rnd % len(SCENARIOS)]
                    for sc in order:
                        d = f"{WORK}/run"
                        rmtree(d)
                        os.makedirs(d)
                        # The proxy's address stands for the registry: every byte goes through it.
                        ref = (traced if sc.startswith("lazy+trace") else plain).replace(
                            addr, proxy, 1)
                        s = scenario_tar(ref, d) if sc == "tar" else scenario_lazysnap(sc, ref, d)
                        s.update(rate=rate, image=img, scenario=sc, round=rnd)
                        samples.append(s)
                        log(f"{rate:g} MB/s r{rnd} {img} {sc}: first ls {s['first_ls']:.2f} s, "
                            f"done {s['done']:.2f} s, {mb(s['bytes_done']):.1f} MB, "
                            f"{s['ranges_done']} ranges")
                        rmtree(d)
            stop_proxy()
    finally:
        stop_proxy()
        umount_all_under(WORK)
        subprocess.run(["bash", f"{HERE}/registry-env.sh", "stop", reg])
        rmtree(WORK)
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/lazy-results.json", "w") as f:
        json.dump({"info": info, "samples": samples}, f, indent=1)
    write_report(info, samples)


def write_report(info, samples):
    table = report(samples, info)
    print(table)
    md = [
        "# Lazy pull benchmark (`scripts/bench-lazy.py`)",
        "",
        f"lazysnap {info['lazysnap']}, {info['started'][:10]}, {info['nproc']} cores, kernel "
        f"{info['kernel']}; median of {info['rounds']} rounds; registry throttled by "
        f"`scripts/registry-proxy.py --rate` (one bucket shared by all connections)"
        + (f", {info['latency_ms']:g} ms latency per request" if info["latency_ms"] else "")
        + f"; load average at the rounds' starts {min(info['loadavg']):.1f}–"
        f"{max(info['loadavg']):.1f} (other work on the machine).",
        "",
        f"Program: `chroot ROOTFS /bin/bash -c \"{info['program']}\"`.",
        "",
        "first ls = pull + mount + `ls` (tar: skopeo copy + tar -x + `ls`); done = first ls + "
        "program. MB = response bytes through the proxy by then (background downloads "
        "included). ×tar = ratio to download + `tar -x` (below 1: faster). The page cache is "
        "dropped before every step (outside the timings).",
        table,
        "",
    ]
    with open(f"{OUT}/lazy-results.md", "w") as f:
        f.write("\n".join(md))
    log(f"wrote {OUT}/lazy-results.md and .json")


if __name__ == "__main__":
    main()
