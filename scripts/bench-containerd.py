#!/usr/bin/env python3
"""Time to a working container, HelloBench-style (issue #16 item 6): from a clean node to the
program finished, through containerd 2.x (scripts/install-containerd2.sh), per snapshotter,
from the loopback registry throttled by scripts/registry-proxy.py.

    scripts/bench-containerd.py     # as root; medians to stdout, bench/containerd-results.{md,json}, -chart.png
    scripts/bench-containerd.py --report   # tables and chart again from bench/containerd-results.json
    ROUNDS=3 RATES=10,100,0 IMAGES=debian-gzip,big-gzip SNAPSHOTTERS=lazysnap,overlayfs scripts/bench-containerd.py
    OUT_NAME=containerd-peers2 SNAPSHOTTERS=lazysnap,erofs,soci,overlayfs scripts/bench-containerd.py
                                    # bench/containerd-peers2-results.{md,json}, -chart.png

RATES are MB/s (10^6 bytes) of one token bucket shared by all connections; 0 = unthrottled.
Per rate, round, image and snapshotter (order rotated each round): a fresh containerd 2.x +
`lazysnap serve` (scripts/containerd-env.sh, own root, state and content store), the page cache
dropped, then `ctr images pull --snapshotter SN` (the transfer service) and `ctr run --rm` of the
image's program; time to program done = pull + run. Bytes are response bodies through the proxy.

Snapshotters: `lazysnap` (the image has a lazysnap index artifact: its layers are not fetched,
the container reads them by range while the rest downloads in the background), `lazysnap-nobg`
(the same, `serve --no-background-fetch`: reads only), `stargz` (stargz-snapshotter, built by
scripts/install-peers.sh, on the image's eStargz conversion where there is one: debian-gzip), `overlayfs`
(containerd's own: fetch, gunzip, untar), `erofs` (containerd 2.x's erofs snapshotter and differ:
fetch, each layer's tar converted by mkfs.erofs --tar into an erofs image the kernel mounts;
erofs-utils built by scripts/install-peers.sh), `soci` (soci-snapshotter v0.16.1, built by
scripts/install-peers.sh, on the image's SOCI-enabled conversion, SOCI index manifest v2 made
here by tools/peers/soci `soci convert` in a scratch containerd and pushed with `ctr images push`:
layers with a zTOC (>= 10 MiB) lazily loaded, the others fetched whole). Images and their programs:

  debian-gzip   python3 importing a good part of the standard library (scripts/bench-lazy.py's)
  big-gzip      a shell command in the 341 MiB / 15k-entry bench image (`ls -l /usr/bin | wc -l`)
  debian-zstd4m the python program again, layers zstd in 4 MiB frames
  huge-gzip     `go version` in a ~900 MB / ~28k-entry image (big-gzip + Go 1.19 and LLVM 15;
                scripts/bench.d/make-huge-image.sh; not in the default IMAGES)

Besides the time and bytes, per sample: the peak RSS (VmHWM) of containerd and, separately, of
the snapshotter's own processes (lazysnap serve + its mount daemons, soci-snapshotter-grpc,
containerd-stargz-grpc; erofs and overlayfs run inside containerd and the kernel), and the disk
used under the fresh containerd's directory (content store, snapshotter roots; FUSE and erofs
mounts not crossed) when the program is done. A case a snapshotter cannot run is recorded
with the reason (samples with "error") and the report says why.
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
# Files OUT/NAME-results.{md,json} and OUT/NAME-chart.png.
OUT_NAME = os.environ.get("OUT_NAME", "containerd")
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
# Bin directories of the peers (scripts/install-peers.sh), set in main() when benchmarked.
PEER_BIN = {}
# The peers' tool in install-peers.sh.
PEER_TOOL = {"stargz": "stargz", "soci": "soci", "erofs": "erofs-utils"}


def log(*a):
    print("[bench-containerd %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def containerd_bin():
    out = subprocess.run(["bash", f"{HERE}/install-containerd2.sh"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


def peer_env(variant, ref, bindir, lazysnap):
    """containerd-env.sh's environment for a snapshotter (variant)."""
    env = dict(os.environ, CONTAINERD_BIN_DIR=bindir, LAZYSNAP_BIN=lazysnap, LAZYSNAP_LOG="warn")
    # lazysnap-nobg: the same snapshotter without the background download of lazy layers.
    if variant == "lazysnap-nobg":
        env["LAZYSNAP_SERVE_ARGS"] = "--no-background-fetch"
    if variant == "stargz":
        env["STARGZ_BIN_DIR"] = PEER_BIN["stargz"]
        env["STARGZ_PLAIN_HTTP"] = ref.split("/", 1)[0]
    if variant == "soci":
        env["SOCI_BIN_DIR"] = PEER_BIN["soci"]
        env["SOCI_PLAIN_HTTP"] = ref.split("/", 1)[0]
        env["SOCI_LOG_LEVEL"] = "warn"
    if variant == "erofs":
        env["EROFS_BIN_DIR"] = PEER_BIN["erofs"]
    return env


# The snapshotter's own processes, by their executable's name (beside containerd).
DAEMONS = {"lazysnap": "lazysnap", "lazysnap-nobg": "lazysnap", "stargz": "containerd-stargz-grpc",
           "soci": "soci-snapshotter-grpc"}


def memory(d, variant):
    """Peak RSS (VmHWM, bytes) of containerd and of the snapshotter's processes (summed) whose
    arguments name the environment directory d."""
    out = {"containerd_rss": 0, "snapshotter_rss": 0}
    for pid in bl.pids_naming(d):
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            hwm = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:")]
        except OSError:
            continue
        kb = int(hwm[0].split()[1]) * 1024 if hwm else 0
        if exe == "containerd":
            out["containerd_rss"] += kb
        elif exe == DAEMONS.get(variant):
            out["snapshotter_rss"] += kb
    return out


def disk(d):
    """Bytes used under d (du -x: mounts not crossed) and in containerd's content store."""
    def du(p):
        r = subprocess.run(["du", "-sxB1", p], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True)
        return int(r.stdout.split()[0]) if r.stdout.strip() else 0
    return {"disk": du(d), "disk_content": du(f"{d}/root/io.containerd.content.v1.content")}


def checked(cmd):
    """stdout of cmd; on failure a RuntimeError naming its last line of stderr that is not
    containerd's cgroup v1 deprecation warning."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        err = [l for l in r.stderr.strip().splitlines() if "DEPRECATION" not in l]
        raise RuntimeError(f"ctr {cmd[5]}: " + (err[-1] if err else f"exit {r.returncode}"))
    return r.stdout


def one(bindir, lazysnap, variant, ref, program, expect):
    """A fresh containerd, then pull + run; returns the sample (seconds, bytes, memory, disk)."""
    d = f"{WORK}/env"
    env = peer_env(variant, ref, bindir, lazysnap)
    sn = "lazysnap" if variant.startswith("lazysnap") else variant
    subprocess.run(["bash", ENV_SH, "stop", d], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    bl.rmtree(d)
    subprocess.run(["bash", ENV_SH, "start", d], env=env, check=True, stdout=subprocess.DEVNULL)
    ctr = [f"{bindir}/ctr", "-a", f"{d}/containerd.sock", "-n", "hb"]
    try:
        bl.drop()
        before = bl.proxy_stats()
        t0 = time.perf_counter()
        checked(ctr + ["images", "pull", "--plain-http", "--snapshotter", sn, ref])
        t1 = time.perf_counter()
        out = checked(ctr + ["run", "--rm", "--snapshotter", sn, ref, "hb1",
                             "/bin/bash", "-c", program])
        t2 = time.perf_counter()
        if expect is not None and out.strip() != expect:
            raise RuntimeError(f"{sn} {ref}: program printed {out!r}")
        after = bl.proxy_stats()
        s = {"pull": t1 - t0, "run": t2 - t1, "total": t2 - t0,
             "bytes": after["bytes"] - before["bytes"]}
        s.update(memory(d, variant))
        s.update(disk(d))
        return s
    finally:
        subprocess.run(["bash", ENV_SH, "stop", d], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        bl.rmtree(d)


def peer_version(sn):
    b = PEER_BIN[sn]
    cmd = {"stargz": [f"{b}/containerd-stargz-grpc", "-version"],
           "soci": [f"{b}/soci-snapshotter-grpc", "--version"],
           "erofs": [f"{b}/mkfs.erofs", "-V"]}[sn]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    words = out.split()
    return next((w for w in words if w[:1].isdigit() or (w[:1] == "v" and w[1:2].isdigit())), out.strip())


def soci_convert(bindir, addr, plain):
    """The SOCI-enabled image of `plain` (SOCI index manifest v2), made in a scratch containerd:
    content fetched from the registry (no proxy), tools/peers/soci `soci convert`, then
    `ctr images push` as lazy/IMG-soci. Returns its reference."""
    d = f"{WORK}/soci-convert"
    dst = plain.replace(":latest", "-soci:latest")
    env = peer_env("overlayfs", plain, bindir, bl.LAZYSNAP)
    subprocess.run(["bash", ENV_SH, "stop", d], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    bl.rmtree(d)
    subprocess.run(["bash", ENV_SH, "start", d], env=env, check=True, stdout=subprocess.DEVNULL)
    ctr = [f"{bindir}/ctr", "-a", f"{d}/containerd.sock", "-n", "soci"]
    try:
        for cmd in (ctr + ["content", "fetch", "--plain-http", plain],
                    [f"{PEER_BIN['soci']}/soci", "-a", f"{d}/containerd.sock", "-n", "soci",
                     "-root", f"{d}/soci-cli", "convert", plain, dst],
                    ctr + ["images", "push", "--plain-http", dst, dst]):
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode:
                last = (r.stdout.strip().splitlines() or ["exit %d" % r.returncode])[-1]
                raise RuntimeError(f"{' '.join(os.path.basename(c) for c in cmd[:1] + cmd[5:7])}: {last}")
    finally:
        subprocess.run(["bash", ENV_SH, "stop", d], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        bl.rmtree(d)
    return dst


def med(samples, field="total", **key):
    v = [s[field] for s in samples if all(s[k] == key[k] for k in key) and field in s]
    return statistics.median(v) if v else None


def failure(samples, **key):
    """Why a snapshotter did not run a case (the first recorded error), else None."""
    for s in samples:
        if "error" in s and all(s[k] == key[k] for k in key):
            return s["error"]
    return None


def command(info):
    c = info.get("command")
    return f"\n\nCommand: `{c}`\n" if c else ""


def write_report(info, samples):
    SNAPSHOTTERS[:] = info.get("snapshotters", SNAPSHOTTERS)
    IMAGES[:] = info.get("images", IMAGES)
    RATES[:] = info.get("rates_MBps", RATES)
    peers = "".join(f"; {k} {v}" for k, v in sorted(info.get("peers", {}).items()))
    notes = {}  # reason -> footnote number
    L = ["# Time to a working container (containerd 2.x, HelloBench-style)\n",
         f"{info['started']}; containerd {info['containerd']}; lazysnap {info['lazysnap']}"
         + (f" (binary built {info['lazysnap_built']} UTC)" if "lazysnap_built" in info else "")
         + f"{peers}; "
         f"{info['rounds']} rounds (medians); {info['nproc']} cores; kernel {info['kernel']}."
         + command(info),
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
                     and s["snapshotter"] == sn and "bytes" in s]
                mbs[sn] = statistics.median(b) / 1e6 if b else None
            cells = []
            for sn in SNAPSHOTTERS:
                why = failure(samples, image=img, rate=rate, snapshotter=sn)
                if vals[sn] is not None:  # [n]: some rounds failed
                    cells.append("%.2f s (%.0f MB)" % (vals[sn], mbs[sn])
                                 + (" [%d]" % notes.setdefault(why, len(notes) + 1) if why else ""))
                elif why:
                    cells.append("— [%d]" % notes.setdefault(why, len(notes) + 1))
                else:
                    cells.append("—")
            ls = vals.get("lazysnap")
            ratios = ["%.2fx" % (ls / vals[sn]) if ls and vals[sn] else "—"
                      for sn in SNAPSHOTTERS if not sn.startswith("lazysnap")]
            prog = PROGRAMS[img] if len(PROGRAMS[img]) < 40 else "python3 importing ~20 modules"
            L.append(f"| {img} | `{prog}` | {'%g MB/s' % rate if rate else 'unthrottled'} | "
                     + " | ".join(cells) + " | " + ", ".join(ratios) + " |")
    L.append("\nRatios are lazysnap's time / the peer's (< 1: lazysnap is faster). MB: bytes "
             "fetched from the registry until the program finished.")
    if any("snapshotter_rss" in s for s in samples):
        L += ["\n## Memory and disk at program done\n",
              "Medians over rounds and rates. RSS: peak (VmHWM) of the snapshotter's own "
              "processes (lazysnap: `serve` + its mount daemons, summed; soci-snapshotter-grpc; "
              "containerd-stargz-grpc; erofs and overlayfs have none: they run in containerd and "
              "the kernel) and of containerd. Disk: everything under the fresh containerd's "
              "directory (content store + snapshotter state, `du -x`: FUSE and erofs mounts not "
              "crossed) when the program finished; content: containerd's content store alone. "
              "Page cache is not counted.\n",
              "| image | snapshotter | snapshotter RSS | containerd RSS | disk | of which content store |",
              "|---|---|---|---|---|---|"]
        for img in IMAGES:
            for sn in SNAPSHOTTERS:
                m = {f: med(samples, f, image=img, snapshotter=sn)
                     for f in ("snapshotter_rss", "containerd_rss", "disk", "disk_content")}
                if m["disk"] is None:
                    why = failure(samples, image=img, snapshotter=sn)
                    tag = " [%d]" % notes.setdefault(why, len(notes) + 1) if why else ""
                    L.append(f"| {img} | {sn} | —{tag} | — | — | — |")
                    continue
                L.append(f"| {img} | {sn} | "
                         + ("%.0f MiB" % (m["snapshotter_rss"] / 2**20) if m["snapshotter_rss"] else "— (in containerd)")
                         + " | %.0f MiB | %.0f MB | %.0f MB |" % (
                             m["containerd_rss"] / 2**20, m["disk"] / 1e6, m["disk_content"] / 1e6))
    if notes:
        L.append("")
        for why, n in sorted(notes.items(), key=lambda kv: kv[1]):
            L.append(f"[{n}] failed (all rounds where there is no figure, else some): {why}")
    text = "\n".join(L) + "\n"
    os.makedirs(OUT, exist_ok=True)
    open(f"{OUT}/{OUT_NAME}-results.md", "w").write(text)
    json.dump({"info": info, "samples": samples}, open(f"{OUT}/{OUT_NAME}-results.json", "w"),
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
    fig.savefig(f"{OUT}/{OUT_NAME}-chart.png", dpi=90)


def main():
    if sys.argv[1:] == ["--report"]:
        data = json.load(open(f"{OUT}/{OUT_NAME}-results.json"))
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
    peers = {}
    for sn, tool in PEER_TOOL.items():
        if sn in SNAPSHOTTERS:
            out = subprocess.run(["bash", f"{HERE}/install-peers.sh", tool], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            PEER_BIN[sn] = out.strip().splitlines()[-1].split("=", 1)[1]
            peers[tool] = peer_version(sn)
    bindir = containerd_bin()
    version = subprocess.run([f"{bindir}/containerd", "--version"], stdout=subprocess.PIPE,
                             text=True).stdout.split()[2]
    commit = subprocess.run(["git", "-C", REPO, "log", "-1", "--format=%h", "--", "src", "fuse"],
                            capture_output=True, text=True).stdout.strip()
    built = time.strftime("%Y-%m-%d %H:%M", time.gmtime(os.path.getmtime(src)))
    info = {"lazysnap": commit, "lazysnap_built": built, "containerd": version, "rounds": ROUNDS, "rates_MBps": RATES,
            "nproc": os.cpu_count(), "kernel": os.uname().release,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "programs": PROGRAMS,
            "images": IMAGES, "snapshotters": SNAPSHOTTERS, "peers": peers,
            "command": " ".join(f"{k}={os.environ[k]}" for k in
                                ("ROUNDS", "RATES", "IMAGES", "SNAPSHOTTERS", "OUT_DIR", "OUT_NAME")
                                if k in os.environ) + " scripts/bench-containerd.py"}
    reg = f"{WORK}/registry"
    addr = bl.run(["bash", f"{HERE}/registry-env.sh", "start", reg], capture=True).strip()
    samples = []
    try:
        refs, estargz, soci, broken = {}, {}, {}, {}
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
            if "soci" in SNAPSHOTTERS:
                try:
                    soci[img] = soci_convert(bindir, addr, plain)
                    log(f"{img}: its SOCI conversion pushed for soci")
                except Exception as e:  # recorded: the soci row says why
                    broken[("soci", img)] = f"soci convert failed: {e}"
                    log(f"{img}: {broken[('soci', img)]}")
        for rate in RATES:
            proxy = bl.start_proxy(addr, rate if rate else 1e6)  # 1e6 MB/s: no limit
            for rnd in range(ROUNDS):
                for img in IMAGES:
                    order = SNAPSHOTTERS[rnd % len(SNAPSHOTTERS):] + SNAPSHOTTERS[:rnd % len(SNAPSHOTTERS)]
                    for sn in order:
                        key = dict(rate=rate, image=img, snapshotter=sn, round=rnd)
                        if (sn, img) in broken:
                            samples.append(dict(key, error=broken[(sn, img)]))
                            continue
                        ref = {"stargz": estargz, "soci": soci}.get(sn, {}).get(img, refs[img])
                        ref = ref.replace(addr, proxy, 1)
                        try:
                            s = one(bindir, bl.LAZYSNAP, sn, ref, PROGRAMS[img], EXPECT[img])
                        except Exception as e:  # recorded; the report says why
                            why = str(e).strip().splitlines()[-1][:300]
                            log(f"{rate:g} MB/s r{rnd} {img} {sn}: FAILED: {why}")
                            samples.append(dict(key, error=why))
                            continue
                        s.update(key)
                        samples.append(s)
                        log(f"{rate:g} MB/s r{rnd} {img} {sn}: pull {s['pull']:.2f}s run "
                            f"{s['run']:.2f}s total {s['total']:.2f}s, {s['bytes'] / 1e6:.1f} MB, "
                            f"RSS {s['snapshotter_rss'] / 2**20:.0f}+{s['containerd_rss'] / 2**20:.0f} MiB, "
                            f"disk {s['disk'] / 1e6:.0f} MB")
            bl.stop_proxy()
    finally:
        bl.stop_proxy()
        bl.run(["bash", f"{HERE}/registry-env.sh", "stop", reg])
    write_report(info, samples)
    chart(samples)


if __name__ == "__main__":
    main()
