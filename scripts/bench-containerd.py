#!/usr/bin/env python3
"""Time to a working container, HelloBench-style (issue #16 item 6): from a clean node to the
program finished, through containerd 2.x (scripts/install-containerd2.sh), per snapshotter,
from the loopback registry throttled by scripts/registry-proxy.py.

    scripts/bench-containerd.py     # as root; medians to stdout, bench/containerd-results.{md,json}, -chart.png
    scripts/bench-containerd.py --report   # tables and chart again from bench/containerd-results.json
    ROUNDS=3 RATES=10,100,0 IMAGES=debian-gzip,big-gzip SNAPSHOTTERS=lazysnap,overlayfs scripts/bench-containerd.py

RATES are MB/s (10^6 bytes) of one token bucket shared by all connections; 0 = unthrottled.
Per rate, round, image and snapshotter (order rotated each round): a fresh containerd 2.x +
`lazysnap serve` (scripts/containerd-env.sh, own root, state and content store), the page cache
dropped, then `ctr images pull --snapshotter SN` (the transfer service) and `ctr run --rm` of the
image's program; time to program done = pull + run. Bytes are response bodies through the proxy.

Snapshotters: `lazysnap` (the image has a lazysnap index artifact: its layers are not fetched,
the container reads them by range while the rest downloads in the background), `lazysnap-nobg`
(the same, `serve --no-background-fetch`: reads only), `stargz` (stargz-snapshotter, built by
scripts/install-peers.sh, on the image's eStargz conversion where there is one: debian-gzip), `overlayfs`
(containerd's own: fetch, gunzip, untar). Images and their programs:

  debian-gzip   python3 importing a good part of the standard library (scripts/bench-lazy.py's)
  big-gzip      a shell command in the 341 MiB / 15k-entry bench image (`ls -l /usr/bin | wc -l`)
  debian-zstd4m the python program again, layers zstd in 4 MiB frames
  huge-gzip     `go version` in a ~900 MB / ~28k-entry image (big-gzip + Go 1.19 and LLVM 15;
                scripts/bench.d/make-huge-image.sh; not in the default IMAGES)
"""

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
spec = importlib.util.spec_from_file_location("bench_lazy", os.path.join(HERE, "bench-lazy.py"))
bl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bl)

OUT = os.environ.get("OUT_DIR", f"{REPO}/bench")
WORK = f"{REPO}/bench/work/containerd"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RATES = [float(r) for r in os.environ.get("RATES", "10,100,0").split(",")]
IMAGES = os.environ.get("IMAGES", "debian-gzip,big-gzip,debian-zstd4m").split(",")
SNAPSHOTTERS = os.environ.get("SNAPSHOTTERS", "lazysnap,lazysnap-nobg,stargz,overlayfs").split(",")
PROGRAMS = {
    "debian-gzip": bl.PROGRAM,
    "debian-zstd4m": bl.PROGRAM,
    "big-gzip": "ls -l /usr/bin | wc -l",
    "huge-gzip": "/usr/lib/go-1.19/bin/go version",
}
EXPECT = {"debian-gzip": "1", "debian-zstd4m": "1", "big-gzip": None, "huge-gzip": None}
ENV_SH = f"{HERE}/containerd-env.sh"
# eStargz conversions (scripts/make-estargz-images.py) of the images, for the stargz peer; an
# image without one is pulled by stargz as is (its non-lazy fallback: fetch and untar).
ESTARGZ = {"debian-gzip": f"{bl.TESTDATA}/debian-estargz"}
STARGZ_BIN = None  # set in main() when stargz is benchmarked


def log(*a):
    print("[bench-containerd %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def containerd_bin():
    out = subprocess.run(["bash", f"{HERE}/install-containerd2.sh"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


def one(bindir, lazysnap, variant, ref, program, expect):
    """A fresh containerd, then pull + run; returns the sample (seconds, bytes)."""
    d = f"{WORK}/env"
    env = dict(os.environ, CONTAINERD_BIN_DIR=bindir, LAZYSNAP_BIN=lazysnap, LAZYSNAP_LOG="warn")
    # lazysnap-nobg: the same snapshotter without the background download of lazy layers.
    sn = "lazysnap" if variant.startswith("lazysnap") else variant
    if variant == "lazysnap-nobg":
        env["LAZYSNAP_SERVE_ARGS"] = "--no-background-fetch"
    if variant == "stargz":
        env["STARGZ_BIN_DIR"] = STARGZ_BIN
        env["STARGZ_PLAIN_HTTP"] = ref.split("/", 1)[0]
    subprocess.run(["bash", ENV_SH, "stop", d], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    bl.rmtree(d)
    subprocess.run(["bash", ENV_SH, "start", d], env=env, check=True, stdout=subprocess.DEVNULL)
    ctr = [f"{bindir}/ctr", "-a", f"{d}/containerd.sock", "-n", "hb"]
    try:
        bl.drop()
        before = bl.proxy_stats()
        t0 = time.perf_counter()
        subprocess.run(ctr + ["images", "pull", "--plain-http", "--snapshotter", sn, ref],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1 = time.perf_counter()
        out = subprocess.run(ctr + ["run", "--rm", "--snapshotter", sn, ref, "hb1",
                                    "/bin/bash", "-c", program],
                             check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True).stdout
        t2 = time.perf_counter()
        if expect is not None and out.strip() != expect:
            raise RuntimeError(f"{sn} {ref}: program printed {out!r}")
        after = bl.proxy_stats()
        return {"pull": t1 - t0, "run": t2 - t1, "total": t2 - t0,
                "bytes": after["bytes"] - before["bytes"]}
    finally:
        subprocess.run(["bash", ENV_SH, "stop", d], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        bl.rmtree(d)


def med(samples, **key):
    v = [s["total"] for s in samples if all(s[k] == key[k] for k in key)]
    return statistics.median(v) if v else None


def write_report(info, samples):
    L = ["# Time to a working container (containerd 2.x, HelloBench-style)\n",
         f"{info['started']}; containerd {info['containerd']}; lazysnap {info['lazysnap']}; "
         f"{info['rounds']} rounds (medians); {info['nproc']} cores; kernel {info['kernel']}.",
         "From a fresh containerd (empty content store, caches dropped) to the program done: "
         "`ctr images pull` (transfer service) + `ctr run --rm`. Registry on loopback behind "
         "scripts/registry-proxy.py throttled to the rate (one link shared by all connections).\n",
         "| image | program | rate | " + " | ".join(SNAPSHOTTERS) + " | lazysnap vs "
         + ", ".join(s for s in SNAPSHOTTERS if not s.startswith("lazysnap")) + " |",
         "|---|---|---|" + "---|" * len(SNAPSHOTTERS) + "---|"]
    for img in IMAGES:
        for rate in RATES:
            vals = {sn: med(samples, image=img, rate=rate, snapshotter=sn) for sn in SNAPSHOTTERS}
            mbs = {}
            for sn in SNAPSHOTTERS:
                b = [s["bytes"] for s in samples if s["image"] == img and s["rate"] == rate
                     and s["snapshotter"] == sn]
                mbs[sn] = statistics.median(b) / 1e6 if b else None
            cells = ["%.2f s (%.0f MB)" % (vals[sn], mbs[sn]) if vals[sn] is not None else "—"
                     for sn in SNAPSHOTTERS]
            ls = vals.get("lazysnap")
            ratios = ["%.2fx" % (ls / vals[sn]) if ls and vals[sn] else "—"
                      for sn in SNAPSHOTTERS if not sn.startswith("lazysnap")]
            prog = PROGRAMS[img] if len(PROGRAMS[img]) < 40 else "python3 importing ~20 modules"
            L.append(f"| {img} | `{prog}` | {'%g MB/s' % rate if rate else 'unthrottled'} | "
                     + " | ".join(cells) + " | " + ", ".join(ratios) + " |")
    L.append("\nRatios are lazysnap's time / the peer's (< 1: lazysnap is faster). MB: bytes "
             "fetched from the registry until the program finished.")
    text = "\n".join(L) + "\n"
    os.makedirs(OUT, exist_ok=True)
    open(f"{OUT}/containerd-results.md", "w").write(text)
    json.dump({"info": info, "samples": samples}, open(f"{OUT}/containerd-results.json", "w"),
              indent=1)
    print(text)


def chart(samples):
    """bench/containerd-chart.png: time to program done per image and rate, bars per snapshotter."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib (scripts/bench-deps.sh installs it into bench/.venv): no chart")
        return
    fig, axes = plt.subplots(1, len(IMAGES), figsize=(4.5 * len(IMAGES), 3.8), squeeze=False)
    for ax, img in zip(axes[0], IMAGES):
        width = 0.8 / len(SNAPSHOTTERS)
        for i, sn in enumerate(SNAPSHOTTERS):
            vals = [med(samples, image=img, rate=r, snapshotter=sn) or 0 for r in RATES]
            ax.bar([x + i * width for x in range(len(RATES))], vals, width, label=sn)
        ax.set_xticks([x + width * (len(SNAPSHOTTERS) - 1) / 2 for x in range(len(RATES))])
        ax.set_xticklabels(["%g MB/s" % r if r else "unthrottled" for r in RATES])
        ax.set_title(img)
        ax.set_ylabel("pull + run to program done (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(f"{OUT}/containerd-chart.png", dpi=90)


def main():
    if sys.argv[1:] == ["--report"]:
        data = json.load(open(f"{OUT}/containerd-results.json"))
        write_report(data["info"], data["samples"])
        return chart(data["samples"])
    if os.geteuid() != 0:
        sys.exit("bench-containerd: needs root")
    src = os.environ.get("LAZYSNAP") or f"{REPO}/target/release/lazysnap"
    if not os.path.exists(src):
        sys.exit(f"bench-containerd: {src} missing (cargo build --release, or LAZYSNAP=…)")
    bl.umount_all_under(WORK)
    bl.rmtree(WORK)
    os.makedirs(WORK)
    bl.WORK = f"{WORK}/lazy"
    bl.LAZYSNAP = f"{WORK}/lazysnap"
    shutil.copy(src, bl.LAZYSNAP)
    bl.IMAGES = IMAGES
    bl.PROGRAM = PROGRAMS.get("debian-gzip")
    layouts = bl.ensure_images()
    if "stargz" in SNAPSHOTTERS:
        global STARGZ_BIN
        out = subprocess.run(["bash", f"{HERE}/install-peers.sh", "stargz"], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        STARGZ_BIN = out.strip().splitlines()[-1].split("=", 1)[1]
    bindir = containerd_bin()
    version = subprocess.run([f"{bindir}/containerd", "--version"], stdout=subprocess.PIPE,
                             text=True).stdout.split()[2]
    commit = subprocess.run(["git", "-C", REPO, "log", "-1", "--format=%h", "--", "src", "fuse"],
                            capture_output=True, text=True).stdout.strip()
    info = {"lazysnap": commit, "containerd": version, "rounds": ROUNDS, "rates_MBps": RATES,
            "nproc": os.cpu_count(), "kernel": os.uname().release,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "programs": PROGRAMS}
    reg = f"{WORK}/registry"
    addr = bl.run(["bash", f"{HERE}/registry-env.sh", "start", reg], capture=True).strip()
    samples = []
    try:
        refs, estargz = {}, {}
        for img in IMAGES:
            bl.PROGRAM = PROGRAMS[img]
            plain, _, _ = bl.setup_image(addr, img, layouts[img])
            refs[img] = plain
            log(f"{img}: pushed with its index artifact")
            if "stargz" in SNAPSHOTTERS and img in ESTARGZ:
                estargz[img] = f"{addr}/lazy/{img}-estargz:latest"
                bl.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{ESTARGZ[img]}:latest", f"docker://{estargz[img]}"])
                log(f"{img}: its eStargz conversion pushed for stargz")
        for rate in RATES:
            proxy = bl.start_proxy(addr, rate if rate else 1e6)  # 1e6 MB/s: no limit
            for rnd in range(ROUNDS):
                for img in IMAGES:
                    order = SNAPSHOTTERS[rnd % len(SNAPSHOTTERS):] + SNAPSHOTTERS[:rnd % len(SNAPSHOTTERS)]
                    for sn in order:
                        ref = (estargz.get(img, refs[img]) if sn == "stargz" else refs[img])
                        ref = ref.replace(addr, proxy, 1)
                        s = one(bindir, bl.LAZYSNAP, sn, ref, PROGRAMS[img], EXPECT[img])
                        s.update(rate=rate, image=img, snapshotter=sn, round=rnd)
                        samples.append(s)
                        log(f"{rate:g} MB/s r{rnd} {img} {sn}: pull {s['pull']:.2f}s run "
                            f"{s['run']:.2f}s total {s['total']:.2f}s, {s['bytes'] / 1e6:.1f} MB")
            bl.stop_proxy()
    finally:
        bl.stop_proxy()
        bl.run(["bash", f"{HERE}/registry-env.sh", "stop", reg])
    write_report(info, samples)
    chart(samples)


if __name__ == "__main__":
    main()
