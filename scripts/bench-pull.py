#!/usr/bin/env python3
"""Pull from a local registry, side by side, round by round (medians and ratios to stdout):

  skopeo copy          docker://REG/IMG -> OCI layout (download only, no index)
  skopeo + import      the same, then `lazysnap import` of the layout (two passes)
  lazysnap pull        download and index in one pass

    scripts/bench-pull.py [IMAGE...]      # default: debian-gzip debian-zstd (target/testdata)
    ROUNDS=5 LAZYSNAP=target/debug/lazysnap scripts/bench-pull.py

The registry is Debian's docker-registry on 127.0.0.1 (scripts/registry-env.sh): loopback, so
this measures the client's own cost (HTTP, hashing, writing, indexing), not a network.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def main():
    images = sys.argv[1:] or ["debian-gzip", "debian-zstd"]
    rounds = int(os.environ.get("ROUNDS", "5"))
    lazysnap = os.environ.get("LAZYSNAP") or next(
        p for p in (f"{REPO}/target/release/lazysnap", f"{REPO}/target/debug/lazysnap")
        if os.path.exists(p))
    data = os.environ.get("LAZYSNAP_TESTDATA", f"{REPO}/target/testdata")
    work = tempfile.mkdtemp(prefix="bench-pull-")
    reg_dir = f"{work}/registry"
    addr = subprocess.run(["bash", f"{HERE}/registry-env.sh", "start", reg_dir], check=True,
                          capture_output=True, text=True).stdout.strip()
    print(f"lazysnap: {lazysnap}; registry {addr}; {rounds} rounds")
    try:
        for img in images:
            ref = f"{addr}/bench/{img}:latest"
            run("skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                f"oci:{data}/{img}:latest", f"docker://{ref}")
            times = {"skopeo copy": [], "skopeo + import": [], "lazysnap pull": []}
            for r in range(rounds):
                d = f"{work}/r{r}"

                def sk():
                    run("skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", f"oci:{d}-sk:latest")

                def sk_import():
                    run("skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", f"oci:{d}-ski:latest")
                    run(lazysnap, "--root", f"{d}-ski-root", "import", f"{d}-ski")

                def pull():
                    run(lazysnap, "--root", f"{d}-pull-root", "pull", ref)

                # Rotate the order so no peer always runs first.
                peers = [("skopeo copy", sk), ("skopeo + import", sk_import), ("lazysnap pull", pull)]
                for name, fn in peers[r % 3:] + peers[:r % 3]:
                    times[name].append(timed(fn))
                for p in (f"{d}-sk", f"{d}-ski", f"{d}-ski-root", f"{d}-pull-root"):
                    shutil.rmtree(p, ignore_errors=True)
            base = statistics.median(times["lazysnap pull"])
            print(f"\n{img}")
            for name, ts in times.items():
                m = statistics.median(ts)
                print(f"  {name:<16} median {m:6.3f} s   x{m / base:5.2f} of lazysnap pull")
    finally:
        subprocess.run(["bash", f"{HERE}/registry-env.sh", "stop", reg_dir])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
