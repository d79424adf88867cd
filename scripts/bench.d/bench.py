#!/usr/bin/env python3
"""bench.py — lazysnap against its peers, side by side, round by round (run by scripts/bench).

Every cold step starts with `sync; echo 3 > /proc/sys/vm/drop_caches`. Each round runs every
engine once per step, in turn, so a busy machine hurts all of them alike; figures are medians.
Raw samples go to bench/results.json; the table to stdout and bench/results.md; the chart to
bench/chart.png. Environment: ROUNDS (default 5; QUICK=1: 3), QUICK, LAZYSNAP (binary),
SKIP (comma list of sections to skip: ready (after round 1), read (remount, read-all, RSS), find,
random, write, commit, containerd), OUT_DIR (default bench/). `bench.py --chart` redraws the chart from results.json.
"""

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")
DATA = os.path.join(BENCH, "data")
WORK = os.path.join(BENCH, "work")
# Where results.{md,json} and chart.png go: a partial run (SKIP=…) should not replace the
# committed full results.
OUT = os.environ.get("OUT_DIR", BENCH)
VENV = os.path.join(BENCH, ".venv")
QUICK = os.environ.get("QUICK") == "1"
ROUNDS = int(os.environ.get("ROUNDS", "3" if QUICK else "5"))
LAZYSNAP = os.environ.get("LAZYSNAP") or os.path.join(REPO, "target", "release", "lazysnap")
# An earlier build, measured beside this one on the FUSE upper's writes (LAZYSNAP_OLD=path).
LAZYSNAP_OLD = os.environ.get("LAZYSNAP_OLD")
RATARMOUNT = os.path.join(VENV, "bin", "ratarmount")
SKIP = set(filter(None, os.environ.get("SKIP", "").split(",")))
CACHE_MIB = 64  # lazysnap's default --cache-size (src/mount.rs DEFAULT_CACHE_SIZE)
SPAN = 4 << 20  # lazysnap's span size (gzip checkpoints / zstd seekable frames)
RANDOM_READS = 200 if QUICK else 500
WRITE_MIB = 64 if QUICK else 256
SMALL_FILES = 2000 if QUICK else 5000
COMMIT_MIB = 30 if QUICK else 100

if QUICK:
    TD = os.path.join(REPO, "target", "testdata")
    TREES = {"gzip": os.path.join(TD, "debian-gzip"), "zstd": os.path.join(TD, "debian-zstd")}
    OCI_ARCHIVE = os.path.join(TD, "debian-gzip.oci.tar")
else:
    TREES = {"gzip": os.path.join(DATA, "big-gzip"), "zstd": os.path.join(DATA, "big-zstd")}
    OCI_ARCHIVE = os.path.join(DATA, "big-gzip.oci.tar")
FILES = {"gzip": os.path.join(DATA, "files-gzip"), "zstd": os.path.join(DATA, "files-zstd")}

SAMPLES = {}  # (section, image, engine) -> [values]
INFO = {}


def log(*a):
    print("[bench %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    """Runs a shell command; output discarded unless capture=True."""
    cap = kw.pop("capture", False)
    kw.setdefault("shell", isinstance(cmd, str))
    r = subprocess.run(cmd, check=kw.pop("check", True), text=True,
                       stdout=subprocess.PIPE if cap else subprocess.DEVNULL, **kw)
    return r.stdout if cap else r


def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def record(section, image, engine, value):
    SAMPLES.setdefault((section, image, engine), []).append(value)


def med(section, image, engine):
    v = SAMPLES.get((section, image, engine))
    return statistics.median(v) if v else None


def layer_blobs(layout):
    def blob(d):
        a, h = d.split(":", 1)
        return os.path.join(layout, "blobs", a, h)
    idx = json.load(open(os.path.join(layout, "index.json")))
    m = json.load(open(blob(idx["manifests"][0]["digest"])))
    return [blob(l["digest"]) for l in m["layers"]]


def rmtree(p):
    if os.path.isdir(p) and not os.path.islink(p):
        sh("rm -rf --one-file-system %s" % p, check=False)


def is_mount(p):
    return os.path.ismount(p)


def wait_mount(p, timeout=120):
    end = time.time() + timeout
    while not is_mount(p):
        if time.time() > end:
            raise RuntimeError("%s did not become a mount" % p)
        time.sleep(0.005)


def fuse_umount(p):
    for _ in range(50):
        if not is_mount(p):
            return
        if subprocess.run(["umount", p], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", p], stderr=subprocess.DEVNULL)
        time.sleep(0.1)
    raise RuntimeError("cannot unmount %s" % p)


def pid_of(needle, mnt):
    """PID of the process whose command line names `needle` and the mountpoint `mnt`."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            args = open("/proc/%s/cmdline" % d, "rb").read().split(b"\0")
        except OSError:
            continue
        s = [a.decode(errors="replace") for a in args]
        if "fuse-keeper" in s:
            continue  # the keeper of a lazysnap mount's connection, not its daemon
        if any(needle in a for a in s) and any(a.rstrip("/") == mnt.rstrip("/") for a in s):
            return int(d)
    return None


def vm_hwm(pid):
    try:
        for line in open("/proc/%d/status" % pid):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # MiB
    except (OSError, TypeError):
        pass
    return None


# ---------------------------------------------------------------- engines (read-only mounts)

class Lazysnap:
    name = "lazysnap"

    def __init__(self, root, image):
        self.root, self.image = root, image

    def mount(self, mnt):
        sh([LAZYSNAP, "--root", self.root, "mount", self.image, mnt])

    def umount(self, mnt):
        sh([LAZYSNAP, "--root", self.root, "umount", mnt])

    def pid(self, mnt):
        return pid_of("lazysnap", mnt)


class LazysnapNoKeeper(Lazysnap):
    """lazysnap without the keeper of its FUSE connection (LAZYSNAP_FUSE_KEEPER=0: cloned
    /dev/fuse fds, a killed daemon leaves a stale mount): what crash recovery costs reads."""
    name = "lazysnap-nokeeper"

    def mount(self, mnt):
        sh([LAZYSNAP, "--root", self.root, "mount", self.image, mnt],
           env=dict(os.environ, LAZYSNAP_FUSE_KEEPER="0"))


class Ratarmount:
    name = "ratarmount"

    def __init__(self, blobs, index_dir):
        self.blobs, self.index_dir = blobs, index_dir

    def mount(self, mnt):
        os.makedirs(self.index_dir, exist_ok=True)
        sh([RATARMOUNT, "--index-folders", self.index_dir, *self.blobs, mnt])
        wait_mount(mnt)

    def umount(self, mnt):
        fuse_umount(mnt)
        # the daemon exits after the unmount; wait so the next step starts clean
        time.sleep(0.05)

    def pid(self, mnt):
        return pid_of("ratarmount", mnt)


class Squashfuse:
    name = "squashfuse"

    def __init__(self, img):
        self.img = img

    def mount(self, mnt):
        sh(["squashfuse", self.img, mnt])
        wait_mount(mnt)

    def umount(self, mnt):
        fuse_umount(mnt)

    def pid(self, mnt):
        return pid_of("squashfuse", mnt)


class Extracted:
    """A plain directory: mount/umount do nothing."""
    name = "extracted"

    def __init__(self, path):
        self.path = path

    def mount(self, mnt):
        pass

    def umount(self, mnt):
        pass

    def pid(self, mnt):
        return None


def where(engine, mnt):
    return engine.path if isinstance(engine, Extracted) else mnt


def read_all(d, label=""):
    """Bytes of `tar -cf - .` in d (errors such as EIO on an entry are noted, not fatal)."""
    r = subprocess.run("set -o pipefail; tar -cf - . 2>/dev/null | wc -c", shell=True, cwd=d,
                       executable="/bin/bash", stdout=subprocess.PIPE, text=True)
    if r.returncode:
        INFO.setdefault("errors", []).append("tar -cf had errors: %s" % (label or d))
    return int(r.stdout.strip())


def find_ls(d, label=""):
    if subprocess.run("find . -ls > /dev/null 2>&1", shell=True, cwd=d).returncode:
        INFO.setdefault("errors", []).append("find -ls had errors: %s" % (label or d))


def random_reads(path, n, seed):
    """n random 4 KiB preads in path; returns sorted latencies in ms."""
    size = os.path.getsize(path)
    rng = random.Random(seed)
    offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(n)]
    fd = os.open(path, os.O_RDONLY)
    lat = []
    try:
        for o in offs:
            t0 = time.perf_counter_ns()
            b = os.pread(fd, 4096, o)
            lat.append((time.perf_counter_ns() - t0) / 1e6)
            assert len(b) == 4096
    finally:
        os.close(fd)
    return sorted(lat)


def pct(sorted_vals, p):
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals))) - 1))
    return sorted_vals[i]


# ---------------------------------------------------------------- preparation

def prepare():
    os.makedirs(WORK, exist_ok=True)
    for m in os.listdir(WORK):  # leftovers of an interrupted run
        p = os.path.join(WORK, m)
        for sub in [p] + ([os.path.join(p, x) for x in os.listdir(p)] if os.path.isdir(p) else []):
            if is_mount(sub):
                fuse_umount(sub)
    prep = {}
    for kind, layout in list(TREES.items()) + [("files-" + k, v) for k, v in FILES.items()]:
        key = kind
        root = os.path.join(WORK, "prep-root-" + key)
        extr = os.path.join(WORK, "extracted-" + key)
        sq = os.path.join(WORK, "%s.squashfs" % key)
        stamp = os.path.join(WORK, "prep-%s.stamp" % key)
        want = "%s %s" % (layout, os.path.getmtime(os.path.join(layout, "index.json")))
        if not (os.path.exists(stamp) and open(stamp).read() == want and os.path.exists(sq)):
            log("preparing %s: extracted copy of the merged tree (through lazysnap) and squashfs" % key)
            for p in (root, extr):
                rmtree(p)
            if os.path.exists(sq):
                os.unlink(sq)
            mnt = os.path.join(WORK, "prep-mnt")
            os.makedirs(mnt, exist_ok=True)
            sh([LAZYSNAP, "--root", root, "import", layout, "--name", "img"])
            sh([LAZYSNAP, "--root", root, "mount", "img", mnt])
            os.makedirs(extr)
            sh("cp -a %s/. %s/" % (mnt, extr))
            sh([LAZYSNAP, "--root", root, "umount", mnt])
            rmtree(root)
            comp = "zstd" if key.endswith("zstd") else "gzip"
            sh(["mksquashfs", extr, sq, "-comp", comp, "-noappend", "-quiet", "-no-progress"])
            open(stamp, "w").write(want)
        blobs = layer_blobs(layout)
        prep[key] = dict(layout=layout, extr=extr, sq=sq, blobs=blobs,
                         comp="zstd" if key.endswith("zstd") else "gzip")
    # sizes, for the report
    for key, p in prep.items():
        out = sh("du -sb --apparent-size %s; find %s | wc -l" % (p["extr"], p["extr"]), capture=True).split()
        p["bytes"] = int(out[0])
        p["files"] = int(out[2])
        p["compressed"] = sum(os.path.getsize(b) for b in p["blobs"])
        INFO[key] = {k: p[k] for k in ("layout", "bytes", "files", "compressed", "comp")}
        INFO[key]["layers"] = len(p["blobs"])
    return prep


def decompress_floor(p):
    tool = "zstd -q" if p["comp"] == "zstd" else "gzip"
    for b in p["blobs"]:
        sh("%s -dc %s > /dev/null" % (tool, b))


def tar_extract(p, dest):
    # Not --recursive-unlink: it empties an existing directory whenever a later layer lists it
    # again (the tree lost a third of its entries). A layer replacing a directory by a file
    # fails that one entry (tar goes on and exits 2); whiteouts stay as files; neither matters
    # for timing.
    flag = "--zstd" if p["comp"] == "zstd" else "-z"
    os.makedirs(dest)
    for b in p["blobs"]:
        r = sh(["tar", flag, "--warning=no-unknown-keyword", "-xf", b, "-C", dest],
               check=False, stderr=subprocess.DEVNULL)
        if r.returncode not in (0, 2):
            raise RuntimeError("tar -x %s: exit %d" % (b, r.returncode))


# ---------------------------------------------------------------- sections

def section_ready_remount_read_find(prep, rnd):
    """Steps 1-4 and 6 on the Debian images, for one round."""
    for key in TREES:
        p = prep[key]
        root = os.path.join(WORK, "ls-root-" + key)
        ridx = os.path.join(WORK, "rat-index-" + key)
        mnt = os.path.join(WORK, "mnt")
        os.makedirs(mnt, exist_ok=True)
        # 1. time to ready
        if "ready" not in SKIP or rnd == 0:
            drop()
            record("floor", key, "decompress", timed(lambda: decompress_floor(p)))
            rmtree(root)
            drop()
            record("ready", key, "lazysnap", timed(lambda: sh(
                [LAZYSNAP, "--root", root, "import", p["layout"], "--name", "img"])))
            dest = os.path.join(WORK, "tarx")
            rmtree(dest)
            drop()
            record("ready", key, "tar -x", timed(lambda: tar_extract(p, dest)))
            rmtree(dest)
            rmtree(ridx)
            drop()
            rat = Ratarmount(p["blobs"], ridx)
            record("ready", key, "ratarmount", timed(lambda: rat.mount(mnt)))
            rat.umount(mnt)
        engines = [Lazysnap(root, "img"), Ratarmount(p["blobs"], ridx), Squashfuse(p["sq"]), Extracted(p["extr"])]
        read_engines = engines[:1] + [LazysnapNoKeeper(root, "img")] + engines[1:]
        # 2 + 3 (+ 6): remount, read-all cold and warm, peak RSS (and lazysnap without its keeper)
        if "read" not in SKIP:
            for e in read_engines:
                drop()
                t = timed(lambda: e.mount(mnt))
                if e.name in ("lazysnap", "ratarmount", "squashfuse"):
                    record("remount", key, e.name, t)
                d = where(e, mnt)
                n = [0]
                record("read cold", key, e.name, timed(lambda: n.__setitem__(0, read_all(d, key + " " + e.name))))
                record("read warm", key, e.name, timed(lambda: read_all(d, key + " " + e.name)))
                INFO.setdefault("tar bytes", {})["%s %s" % (key, e.name)] = n[0]
                hwm = vm_hwm(e.pid(mnt))
                if hwm is not None:
                    record("rss", key, e.name, hwm)
                e.umount(mnt)
        # 4. metadata walk
        if "find" not in SKIP:
            for e in engines:
                e.mount(mnt)
                d = where(e, mnt)
                drop()
                record("find cold", key, e.name, timed(lambda: find_ls(d, key + " " + e.name)))
                record("find warm", key, e.name, timed(lambda: find_ls(d, key + " " + e.name)))
                e.umount(mnt)


def section_random(prep, rnd):
    """Step 5: random 4 KiB reads in the big file, cold (fresh mount, caches dropped)."""
    for comp in ("gzip", "zstd"):
        key = "files-" + comp
        p = prep[key]
        root = os.path.join(WORK, "ls-root-" + key)
        ridx = os.path.join(WORK, "rat-index-" + key)
        mnt = os.path.join(WORK, "mnt")
        if rnd == 0:
            rmtree(root)
            rmtree(ridx)
            sh([LAZYSNAP, "--root", root, "import", p["layout"], "--name", "img"])
            r = Ratarmount(p["blobs"], ridx)
            r.mount(mnt)
            r.umount(mnt)
        engines = [Lazysnap(root, "img"), Ratarmount(p["blobs"], ridx), Squashfuse(p["sq"]), Extracted(p["extr"])]
        for e in engines:
            e.mount(mnt)
            drop()
            lat = random_reads(os.path.join(where(e, mnt), "bin", "file256"), RANDOM_READS, seed=rnd)
            record("random p50", key, e.name, pct(lat, 50))
            record("random p99", key, e.name, pct(lat, 99))
            hwm = vm_hwm(e.pid(mnt))
            if hwm is not None:
                record("rss random", key, e.name, hwm)
            e.umount(mnt)
        # the time to decompress one span: span size at the floor's speed
        drop()
        t = timed(lambda: decompress_floor(p))
        record("span time", key, "decompress", SPAN / (p["bytes"] / t) * 1000.0)


def untar_source(p):
    """A tar of the image's /usr (thousands of real entries), made once per run: the untar step."""
    out = os.path.join(WORK, "untar-src.tar")
    if not os.path.exists(out):
        sh(["tar", "-cf", out, "-C", p["extr"], "usr"])
        INFO["untar entries"] = int(sh("tar -tf %s | wc -l" % out, capture=True))
    return out


def lower_files(p):
    """Relative paths of the image's regular files: what the copy-up step appends to."""
    files = []
    for dp, dns, fns in os.walk(p["extr"]):
        for fn in fns:
            f = os.path.join(dp, fn)
            if os.path.isfile(f) and not os.path.islink(f):
                files.append(os.path.relpath(f, p["extr"]))
    return sorted(files)


def snapshot_tests(d, tarball, files):
    """In a container's snapshot d: untar of `tarball` into a new directory (s), and an append
    of 1 byte to every lower file in `files` (s: each a copy-up)."""
    os.sync()
    ud = os.path.join(d, "bench-untar")
    os.mkdir(ud)
    untar = timed(lambda: sh(["tar", "-xf", tarball, "-C", ud]))
    os.sync()
    t0 = time.perf_counter()
    for rel in files:
        with open(os.path.join(d, rel), "ab") as f:
            f.write(b"x")
    append = time.perf_counter() - t0
    return untar, append


def write_tests(d):
    """Sequential write MB/s (1 MiB blocks, fsync) and small-file creates/s in directory d."""
    buf = os.urandom(1 << 20)
    path = os.path.join(d, "bench-seq")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(WRITE_MIB):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    seq = WRITE_MIB / (time.perf_counter() - t0)
    # Writeback of what came before (this write, the previous peer's) must not land in the
    # creates' time: without this, whichever peer ran second measured the first one's flush.
    os.sync()
    sd = os.path.join(d, "bench-small")
    os.mkdir(sd)
    small = b"x" * 1024
    t0 = time.perf_counter()
    for i in range(SMALL_FILES):
        fd = os.open(os.path.join(sd, "f%05d" % i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, small)
        os.close(fd)
    creates = SMALL_FILES / (time.perf_counter() - t0)
    return seq, creates


def copy_changes(src, dest, limit):
    """Copies regular files of src (sorted walk) into dest until `limit` bytes: realistic changes."""
    total = 0
    for dp, dns, fns in os.walk(src):
        dns.sort()
        for fn in sorted(fns):
            s = os.path.join(dp, fn)
            if os.path.islink(s) or not os.path.isfile(s):
                continue
            rel = os.path.relpath(s, src)
            t = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(t), exist_ok=True)
            shutil.copyfile(s, t)
            total += os.path.getsize(s)
            if total >= limit:
                return total
    return total


def section_write(prep, rnd):
    """Step 7: writes in an active snapshot vs native, fuse-overlayfs, kernel overlayfs; commit."""
    key = "gzip"
    p = prep[key]
    root = os.path.join(WORK, "ls-root-" + key)
    mnt = os.path.join(WORK, "mnt")
    base = os.path.join(WORK, "w")
    rmtree(base)
    os.makedirs(base)
    tarball = untar_source(p)
    files = lower_files(p)
    # native
    nd = os.path.join(base, "native")
    os.makedirs(nd)
    os.sync()
    s, c = write_tests(nd)
    record("write seq", key, "native", s)
    record("creates", key, "native", c)
    # kernel overlayfs and fuse-overlayfs over the extracted tree
    for name in ("overlayfs", "fuse-overlayfs"):
        up, wk = os.path.join(base, name + "-up"), os.path.join(base, name + "-wk")
        os.makedirs(up)
        os.makedirs(wk)
        opts = "lowerdir=%s,upperdir=%s,workdir=%s" % (p["extr"], up, wk)
        if name == "overlayfs":
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], stderr=subprocess.PIPE, text=True)
        else:
            r = subprocess.run(["fuse-overlayfs", "-o", opts, mnt], stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            INFO.setdefault("errors", []).append("%s: %s" % (name, r.stderr.strip()))
            continue
        s, c = write_tests(mnt)
        record("write seq", key, name, s)
        record("creates", key, name, c)
        u, a = snapshot_tests(mnt, tarball, files)
        record("untar", key, name, u)
        record("copy-up append", key, name, a)
        fuse_umount(mnt)
    # lazysnap --rw in both upper modes: overlay (the kernel's overlayfs over the shared lazy
    # lower; the default as root) and fuse (lazysnap serves the upper: the rootless fallback);
    # the FUSE upper also without its keeper (what recovery costs writes) and, given
    # LAZYSNAP_OLD, as an earlier build serves it
    variants = [("fuse", "lazysnap fuse", LAZYSNAP, {}),
                ("fuse", "lazysnap fuse, no keeper", LAZYSNAP, {"LAZYSNAP_FUSE_KEEPER": "0"})]
    if LAZYSNAP_OLD:
        variants.append(("fuse", "lazysnap fuse, old build", LAZYSNAP_OLD, {}))
    variants.append(("overlay", "lazysnap", LAZYSNAP, {}))
    # rounds alternate the order of the FUSE variants
    fuse_variants = variants[:-1]
    if rnd % 2:
        fuse_variants.reverse()
    for mode, name, binary, extra in fuse_variants + variants[-1:]:
        sh([binary, "--root", root, "--upper", mode, "mount", "img", mnt, "--rw"],
           env=dict(os.environ, **extra))
        if mode == "overlay":
            # read-all through the container's overlay vs the read-only mount alone (step 3)
            drop()
            record("overlay read cold", key, name, timed(lambda: read_all(mnt, "overlay")))
            record("overlay read warm", key, name, timed(lambda: read_all(mnt, "overlay")))
        s, c = write_tests(mnt)
        record("write seq", key, name, s)
        record("creates", key, name, c)
        u, a = snapshot_tests(mnt, tarball, files)
        record("untar", key, name, u)
        record("copy-up append", key, name, a)
        if mode == "overlay" and "commit" not in SKIP:
            # commit of COMMIT_MIB of changes (files copied from the image's own tree) vs tar | zstd -3
            shutil.rmtree(os.path.join(mnt, "bench-small"))
            shutil.rmtree(os.path.join(mnt, "bench-untar"))
            os.unlink(os.path.join(mnt, "bench-seq"))
            limit = COMMIT_MIB << 20
            copy_changes(os.path.join(p["extr"], "usr"), os.path.join(mnt, "bench-changes"), limit)
            cd = os.path.join(base, "changes")
            copy_changes(os.path.join(p["extr"], "usr"), os.path.join(cd, "bench-changes"), limit)
            os.sync()
            record("commit", key, "lazysnap", timed(lambda: sh(
                [LAZYSNAP, "--root", root, "commit", mnt, "bench-commit-%d" % rnd])))
            out = os.path.join(base, "changes.tar.zst")
            record("commit", key, "tar | zstd -3", timed(lambda: sh(
                "tar -cf - -C %s . | zstd -3 -q -T1 > %s && sync %s" % (cd, out, out))))
        sh([binary, "--root", root, "umount", mnt])
        sh([LAZYSNAP, "--root", root, "snapshot", "rm", "rw:" + os.path.realpath(mnt)], check=False)
    sh([LAZYSNAP, "--root", root, "rmi", "bench-commit-%d" % rnd], check=False)
    rmtree(base)


def section_containerd(prep, rnd):
    """Step 8: ctr images import + first ctr run, lazysnap vs overlayfs, a fresh containerd each."""
    env_sh = os.path.join(REPO, "scripts", "containerd-env.sh")
    for snap in ("lazysnap", "overlayfs"):
        d = os.path.join(WORK, "ctrd")
        env = dict(os.environ, LAZYSNAP_BIN=LAZYSNAP, LAZYSNAP_LOG="warn")
        sh([env_sh, "stop", d], check=False, env=env, stderr=subprocess.DEVNULL)
        rmtree(d)
        sh([env_sh, "start", d], env=env)
        try:
            ctr = ["ctr", "-a", os.path.join(d, "containerd.sock"), "-n", "bench"]
            drop()
            ti = timed(lambda: sh(ctr + ["images", "import", "--snapshotter", snap, OCI_ARCHIVE]))
            ref = sh(ctr + ["images", "ls", "-q"], capture=True).split()[0]
            tr = timed(lambda: sh(ctr + ["run", "--rm", "--snapshotter", snap, ref, "bench%d" % rnd,
                                         "/usr/bin/python3", "-c", "import json, sqlite3"]))
            record("ctr import", "gzip", snap, ti)
            record("ctr run", "gzip", snap, tr)
            record("ctr import+run", "gzip", snap, ti + tr)
        finally:
            sh([env_sh, "stop", d], check=False, env=env)
            rmtree(d)


# ---------------------------------------------------------------- report

def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "s":
        return "%.3f s" % v if v < 10 else "%.1f s" % v
    if unit == "ms":
        return "%.2f ms" % v
    if unit == "MiB":
        return "%.0f MiB" % v
    if unit == "MB/s":
        return "%.0f MB/s" % v
    if unit == "/s":
        return "%.0f/s" % v
    return "%.3g" % v


def report(prep, started):
    rows = []  # metric, image, {engine: value}, unit
    imgs = list(TREES)
    M = lambda s, k, e: med(s, k, e)

    def row(metric, section, key, engines, unit):
        vals = {e: M(section, key, e) for e in engines}
        if any(v is not None for v in vals.values()):
            rows.append((metric, key, vals, unit))
    for k in imgs:
        row("1 time to ready", "ready", k, ["lazysnap", "tar -x", "ratarmount"], "s")
        row("1 decompression floor", "floor", k, ["decompress"], "s")
        row("2 remount (cold cache)", "remount", k, ["lazysnap", "ratarmount", "squashfuse"], "s")
        for s in ("read cold", "read warm", "find cold", "find warm"):
            row("%s %s" % ("3" if s.startswith("read") else "4", s), s, k,
                ["lazysnap", "ratarmount", "squashfuse", "extracted"], "s")
        row("3 read cold, keeper vs none", "read cold", k, ["lazysnap", "lazysnap-nokeeper"], "s")
        row("6 peak RSS after read-all", "rss", k, ["lazysnap", "ratarmount", "squashfuse"], "MiB")
    for k in ("files-gzip", "files-zstd"):
        row("5 random 4K p50", "random p50", k, ["lazysnap", "ratarmount", "squashfuse", "extracted"], "ms")
        row("5 random 4K p99", "random p99", k, ["lazysnap", "ratarmount", "squashfuse", "extracted"], "ms")
        row("5 one span decompressed", "span time", k, ["decompress"], "ms")
        row("6 peak RSS after random", "rss random", k, ["lazysnap", "ratarmount", "squashfuse"], "MiB")
    fv = ["lazysnap fuse", "lazysnap fuse, no keeper"] + (["lazysnap fuse, old build"] if LAZYSNAP_OLD else [])
    wr = ["lazysnap"] + fv + ["native", "overlayfs", "fuse-overlayfs"]
    row("7 sequential write", "write seq", "gzip", wr, "MB/s")
    row("7 small-file creates", "creates", "gzip", wr, "/s")
    sn = ["lazysnap"] + fv + ["overlayfs", "fuse-overlayfs"]
    row("7 untar %s entries" % INFO.get("untar entries", "?"), "untar", "gzip", sn, "s")
    row("7 copy-up append to every lower file", "copy-up append", "gzip", sn, "s")
    row("7 read-all through the overlay, cold", "overlay read cold", "gzip", ["lazysnap"], "s")
    row("7 read-all through the overlay, warm", "overlay read warm", "gzip", ["lazysnap"], "s")
    row("7 commit %d MiB of changes" % COMMIT_MIB, "commit", "gzip", ["lazysnap", "tar | zstd -3"], "s")
    row("8 ctr import", "ctr import", "gzip", ["lazysnap", "overlayfs"], "s")
    row("8 ctr run (first)", "ctr run", "gzip", ["lazysnap", "overlayfs"], "s")
    row("8 ctr import + run", "ctr import+run", "gzip", ["lazysnap", "overlayfs"], "s")

    goals = []

    def goal(text, key, value, limit, op="<="):
        if value is None:
            goals.append((text, key, None, limit, "not measured", op))
            return
        ok = value <= limit if op == "<=" else value >= limit
        goals.append((text, key, value, limit, "met" if ok else "NOT met", op))
    for k in imgs:
        ls = M("ready", k, "lazysnap")
        goal("time to ready / decompression", k, ratio(ls, M("floor", k, "decompress")), 1.25)
        goal("time to ready / tar -x", k, ratio(ls, M("ready", k, "tar -x")), 0.5)
        goal("time to ready / ratarmount index", k, ratio(ls, M("ready", k, "ratarmount")), 0.3)
        goal("remount (s)", k, M("remount", k, "lazysnap"), 0.050)
        rc = M("read cold", k, "lazysnap")
        goal("cold read-all / decompression", k, ratio(rc, M("floor", k, "decompress")), 1.5)
        goal("ratarmount cold read-all / lazysnap (speedup)", k, ratio(M("read cold", k, "ratarmount"), rc), 3, ">=")
        goal("squashfuse cold read-all / lazysnap (speedup)", k, ratio(M("read cold", k, "squashfuse"), rc), 3, ">=")
        goal("warm read-all / extracted", k, ratio(M("read warm", k, "lazysnap"), M("read warm", k, "extracted")), 1.5)
        goal("find -ls warm / extracted", k, ratio(M("find warm", k, "lazysnap"), M("find warm", k, "extracted")), 2)
        goal("peak RSS (MiB) <= 64 + cache %d" % CACHE_MIB, k, M("rss", k, "lazysnap"), 64 + CACHE_MIB)
    for k in ("files-gzip", "files-zstd"):
        goal("random 4K p99 / one span's decompression", k,
             ratio(M("random p99", k, "lazysnap"), M("span time", k, "decompress")), 1.0)
    goal("sequential write / native", "gzip", ratio(M("write seq", "gzip", "lazysnap"), M("write seq", "gzip", "native")), 0.5, ">=")
    goal("small-file creates / native", "gzip", ratio(M("creates", "gzip", "lazysnap"), M("creates", "gzip", "native")), 0.5, ">=")
    ov = lambda s: ratio(M(s, "gzip", "lazysnap"), M(s, "gzip", "overlayfs"))
    goal("untar / kernel overlayfs", "gzip", ov("untar"), 1.2)
    goal("copy-up append / kernel overlayfs", "gzip", ov("copy-up append"), 1.2)
    goal("sequential write / kernel overlayfs", "gzip", ov("write seq"), 0.9, ">=")
    for w in ("cold", "warm"):
        goal("read-all through the overlay, %s / read-only mount" % w, "gzip",
             ratio(M("overlay read " + w, "gzip", "lazysnap"), M("read " + w, "gzip", "lazysnap")), 1.1)
    goal("commit / tar | zstd -3", "gzip", ratio(M("commit", "gzip", "lazysnap"), M("commit", "gzip", "tar | zstd -3")), 1.2)
    goal("ctr import + first run / overlayfs", "gzip",
         ratio(M("ctr import+run", "gzip", "lazysnap"), M("ctr import+run", "gzip", "overlayfs")), 0.5)

    L = []
    L.append("# lazysnap benchmark\n")
    L.append("%s; %d rounds (medians)%s; %s; %d cores; took %.0f s.\n" % (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), ROUNDS, ", QUICK" if QUICK else "",
        os.uname().release, os.cpu_count(), time.time() - started))
    L.append("Images:\n")
    for k, v in INFO.items():
        if isinstance(v, dict) and "layers" in v:
            L.append("- `%s`: %d layers, %.1f MiB uncompressed (merged tree), %.1f MiB compressed, %d entries (`%s`)" % (
                k, v["layers"], v["bytes"] / 2**20, v["compressed"] / 2**20, v["files"], os.path.relpath(v["layout"], REPO)))
    L.append("")
    L.append("## Figures (medians)\n")
    L.append("| measurement | image | lazysnap | peers | lazysnap vs peers |")
    L.append("|---|---|---|---|---|")
    for metric, k, vals, unit in rows:
        lv = vals.get("lazysnap")
        peers = [(e, v) for e, v in vals.items() if e != "lazysnap"]
        ps = ", ".join("%s %s" % (e, fmt(v, unit)) for e, v in peers)
        rs = ", ".join("%.2fx %s" % (lv / v, e) for e, v in peers if lv is not None and v)
        L.append(("| %s | %s | %s | %s | %s |" % (metric, k, fmt(lv, unit) if "lazysnap" in vals else "",
                                                  ps.replace("|", "\\|"), rs.replace("|", "\\|"))))
    L.append("")
    L.append("Ratios are lazysnap / peer (for times: < 1 is faster; for MB/s and creates/s: > 1 is faster).\n")
    L.append("## Goals (issues 6 and 15)\n")
    L.append("| goal | image | measured | limit | status |")
    L.append("|---|---|---|---|---|")
    for text, k, v, lim, st, op in goals:
        L.append("| %s | %s | %s | %s %s | %s |" % (text.replace("|", "\\|"), k, "—" if v is None else "%.3f" % v,
                                                  op, lim, st))
    L.append("")
    L.append("Notes: time to ready for lazysnap is `lazysnap import` into an empty root (copy into the content store, "
             "fsync, index every layer); `tar -x` extracts the layers in order into an empty directory (no fsync, no "
             "whiteouts); ratarmount is the time until its union mount of the layer blobs is usable with its indexes "
             "written (it ships rapidgzip and uses it for gzip). The floor is `gzip -dc` / `zstd -dc` of every layer "
             "blob in turn. Read-all is `tar -cf - . | wc -c` on a fresh mount after drop_caches (cold) and again "
             "(warm); ratarmount does not apply OCI whiteouts, so its tree differs slightly. One span's decompression "
             "is %d MiB at the floor's speed on that image. RSS is VmHWM of the daemon at the end of the step."
             % (SPAN >> 20))
    if INFO.get("errors"):
        L.append("\nErrors: " + "; ".join(sorted(set(INFO["errors"]))))
    md = "\n".join(L) + "\n"
    print(md)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(md)
    js = dict(rounds=ROUNDS, quick=QUICK, info=INFO,
              medians=[dict(metric=m, image=k, unit=u, values=v) for m, k, v, u in rows],
              goals=[dict(goal=t, image=k, measured=v, limit=l, op=o, status=s) for t, k, v, l, s, o in goals],
              samples=[dict(section=s, image=k, engine=e, values=v) for (s, k, e), v in SAMPLES.items()])
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(js, f, indent=1)
    chart(rows)


def chart(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    skip = ("1 decompression", "2", "8 ctr import", "8 ctr run")
    panels = [r for r in rows if r[3] == "s" and (r[0] == "8 ctr import + run" or not r[0].startswith(skip))]
    panels += [r for r in rows if r[3] in ("ms", "MB/s", "/s", "MiB") and not r[0].startswith("5 one span")]
    n = len(panels)
    cols = 4
    rws = (n + cols - 1) // cols
    fig, axes = plt.subplots(rws, cols, figsize=(4.2 * cols, 2.8 * rws))
    axes = axes.flatten() if n > 1 else [axes]
    colors = {"lazysnap": "#d62728"}
    for ax, (metric, k, vals, unit) in zip(axes, panels):
        names = [e for e, v in vals.items() if v is not None]
        vs = [vals[e] for e in names]
        ax.barh(names, vs, color=[colors.get(e, "#7f7f7f") for e in names])
        ax.set_title("%s (%s)" % (metric[2:], k), fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle("lazysnap vs peers — medians of %d rounds%s (lower is better for s/ms/MiB)" % (ROUNDS, ", QUICK" if QUICK else ""))
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "chart.png"), dpi=90)


def main():
    if sys.argv[1:] == ["--chart"]:  # redraw bench/chart.png from bench/results.json
        global ROUNDS, QUICK
        js = json.load(open(os.path.join(OUT, "results.json")))
        ROUNDS, QUICK = js["rounds"], js["quick"]
        chart([(m["metric"], m["image"], m["values"], m["unit"]) for m in js["medians"]])
        return
    started = time.time()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (drop_caches, mounts)")
    prep = prepare()
    sections = [("steps 1-4, 6", section_ready_remount_read_find)]
    if "random" not in SKIP:
        sections.append(("step 5", section_random))
    if "write" not in SKIP:
        sections.append(("step 7", section_write))
    if "containerd" not in SKIP:
        sections.append(("step 8", section_containerd))

    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        for rnd in range(ROUNDS):
            for name, fn in sections:
                log("round %d/%d: %s" % (rnd + 1, ROUNDS, name))
                try:
                    fn(prep, rnd)
                except subprocess.CalledProcessError as e:
                    INFO.setdefault("errors", []).append("%s: %s" % (name, e))
                    log("error in %s: %s" % (name, e))
    finally:
        mnt = os.path.join(WORK, "mnt")
        if is_mount(mnt):
            fuse_umount(mnt)
    report(prep, started)


if __name__ == "__main__":
    main()
