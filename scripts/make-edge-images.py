#!/usr/bin/env python3
"""make-edge-images.py OUT — small OCI images full of tar and layering edge cases.

Python stdlib (tarfile) for most layers, GNU tar for the two sparse layers. Deterministic
(seeded random data, fixed mtimes, owner 0 unless the case is about owners). Idempotent: a stamp
OUT/edge.stamp holds the sha256 of this script and mkimage.py; when it matches and the outputs
exist nothing is rebuilt.

ONE multi-case image per compression (every case lives in its own top-level directory, so the
cases don't interfere), all tagged "latest":

  edge-gzip/   every layer `gzip -n`          edge-zstd/   every layer one zstd frame
  edge-none/   uncompressed layers            edge-mixed/  per-layer mix: gzip-multi (several
               gzip members), zstd-multi (several frames, 1 MiB chunks), pigz, gzip, zstd, none
  edge.oci.tar OCI archive of edge-gzip/      edge-docker.tar  classic `docker save` archive
               (mkimage.py's writer: <id>/layer.tar, manifest.json, repositories), name
               lazysnap-test/edge:latest
  edge-layers/ the uncompressed layer tars, NN-name.tar

Layers, bottom to top (F = tar format):
  01-base       F=pax  the lower state every case starts from
  02-changes    F=pax  whiteout/ (file + dir with subtree), opaque/o1 (dir entry, marker, re-adds),
                       opaque/o2 (marker with no dir entry), readd/ (whiteouts), replace/
                       (file->dir, dir(subtree)->file, symlink->dir, dir->symlink),
                       hardlinks/ (3 names, one in a subdir, link to a file in a subdir,
                       a link whose target is overwritten later in the same layer),
                       hardlink-lower/b overwritten (sibling a keeps old bytes, nlink 1),
                       xattrs/ (user.* text+binary, security.capability, xattr on a dir,
                       and user.empty with a zero-length value: POSIX says an empty PAX
                       record deletes the keyword, so Go's archive/tar — umoci, containerd —
                       drops it and the reference has no user.empty: the view must not show it;
                       binary values are written by tarfile with hdrcharset=BINARY),
                       subsec/ (ns mtimes on files, dir, symlink), ids/ (uid/gid 2097151,
                       2097152, 3000000, 4294967294 in PAX), devices/ (char 1:3, char 259:300,
                       block 8:0, fifo), modes/ (04755 02755 01777 02775 07777 0000 0400),
                       empty/ (two empty files, not links), dup/ (same file 3x: last wins;
                       a dir twice with different modes; file then symlink; symlink then file),
                       implicit/a/b/c (no entries for implicit, implicit/a, implicit/a/b),
                       unicode/ (UTF-8 names)
  03-readd      F=pax  readd/f and readd/d re-added after the whiteout (old readd/d/x stays
                       gone), hardlinks/.wh.h3 (a hardlink group loses one name), whiteout of
                       a name that never existed (must be harmless)
  04-gnu        F=gnu  longgnu/: names > 100 bytes (one component of 255 bytes), a path > 255
                       bytes total, symlink and hardlink targets > 100 bytes (././@LongLink 'L'
                       and 'K'), uid/gid 3000000/5000000 as GNU base-256 numbers
  05-paxlong    F=pax  longpax/: the same through PAX path/linkpath records
  06-dirsonly   F=pax  only directories: new dirsonly/a/b/, and meta/ re-declared with mode
                       0711, a new mtime and an xattr (its lower children stay)
  07-empty      F=-    a tar with no entries at all (10240 zero bytes)
  08-sparse-gnu F=gnu  GNU tar --sparse --format=gnu: sparse/gnu-{data,allhole,tail} with real
                       holes (truncate + dd conv=notrunc)
  09-sparse-pax F=pax  GNU tar --sparse --format=pax --sparse-version=1.0 (raw names
                       GNUSparseFile.1/pax-*, real name in GNU.sparse.name, map at the start of
                       the data; tar-rs does NOT decode this: it sees a regular file holding
                       map+data): sparse/pax-{data,allhole,tail}, same bytes as the gnu-* files
  10-big        F=pax  big/: random-20m (20 MiB seeded random), random-5m, zeros-8m,
                       mixed-6m (1 MiB random / 1 MiB zeros alternating), random-20m-link
                       (hardlink to the 20 MiB file)

Reference trees come from umoci (scripts/reference-unpack.sh); directories that no layer
declares (implicit/, implicit/a, implicit/a/b) get umoci's "now" mtime there, which the
comparator ignores (see reference-unpack.sh).
"""

import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
T0 = 1700000000


class Layer:
    def __init__(self, path, fmt=tarfile.PAX_FORMAT):
        self.tf = tarfile.open(path, "w", format=fmt)

    def _ti(self, name, type_, mode, uid=0, gid=0, mtime=T0, pax=None):
        t = tarfile.TarInfo(name)
        t.type, t.mode, t.uid, t.gid = type_, mode, uid, gid
        t.uname = t.gname = ""
        t.mtime = mtime
        if pax:
            t.pax_headers = dict(pax)
            if "mtime" in pax:
                t.mtime = int(float(pax["mtime"]))
        return t

    def dir(self, name, mode=0o755, **kw):
        self.tf.addfile(self._ti(name, tarfile.DIRTYPE, mode, **kw))

    def file(self, name, data=b"", mode=0o644, **kw):
        t = self._ti(name, tarfile.REGTYPE, mode, **kw)
        t.size = len(data)
        self.tf.addfile(t, io.BytesIO(data))

    def wh(self, name):
        self.file(name, b"", 0o600)

    def symlink(self, name, target, **kw):
        t = self._ti(name, tarfile.SYMTYPE, 0o777, **kw)
        t.linkname = target
        self.tf.addfile(t)

    def link(self, name, target, **kw):
        t = self._ti(name, tarfile.LNKTYPE, 0o644, **kw)
        t.linkname = target
        self.tf.addfile(t)

    def dev(self, name, type_, major, minor, mode=0o600, **kw):
        t = self._ti(name, type_, mode, **kw)
        t.devmajor, t.devminor = major, minor
        self.tf.addfile(t)

    def fifo(self, name, mode=0o644, **kw):
        self.tf.addfile(self._ti(name, tarfile.FIFOTYPE, mode, **kw))

    def close(self):
        self.tf.close()


def binx(b):
    """A binary xattr value for tarfile's PAX writer (bytes kept as-is, hdrcharset=BINARY)."""
    return b.decode("utf-8", "surrogateescape")


def rnd(seed, n):
    return random.Random(seed).randbytes(n)


def layer_base(p):
    L = Layer(p)
    for d in ("whiteout", "whiteout/dir-a", "whiteout/dir-a/sub", "whiteout/dir-b"):
        L.dir(d)
    L.file("whiteout/dir-a/sub/x", b"x\n")
    L.file("whiteout/dir-a/y", b"y\n")
    L.file("whiteout/dir-b/keep", b"keep\n")
    L.file("whiteout/file-a", b"file-a\n")
    L.file("whiteout/file-b", b"file-b\n")
    for d in ("opaque", "opaque/o1", "opaque/o1/sub", "opaque/o2", "opaque/o3"):
        L.dir(d)
    L.file("opaque/o1/a", b"lower a\n")
    L.file("opaque/o1/b", b"lower b\n")
    L.file("opaque/o1/sub/c", b"lower c\n")
    L.file("opaque/o2/a", b"lower o2/a\n")
    L.file("opaque/o3/untouched", b"o3 has no marker\n")
    L.dir("readd")
    L.file("readd/f", b"original f\n")
    L.dir("readd/d", mode=0o700)
    L.file("readd/d/x", b"old x: must not come back\n")
    L.dir("replace")
    L.file("replace/f2d", b"a file that becomes a dir\n")
    L.dir("replace/d2f")
    L.dir("replace/d2f/sub")
    L.dir("replace/d2f/sub/deep")
    L.file("replace/d2f/sub/deep/file", b"deep\n")
    L.symlink("replace/sym2d", "d2f")
    L.dir("replace/d2sym")
    L.file("replace/d2sym/inner", b"inner\n")
    L.dir("hardlink-lower")
    L.file("hardlink-lower/a", b"lower hardlink content\n")
    L.link("hardlink-lower/b", "hardlink-lower/a")
    L.link("hardlink-lower/c", "hardlink-lower/a")
    L.dir("meta", mode=0o755, mtime=T0 - 1000)
    L.file("meta/child", b"child of meta\n")
    L.close()


def layer_changes(p):
    L = Layer(p)
    T = T0 + 100
    # whiteouts (the dir itself has no entry in this layer: an implied parent)
    L.wh("whiteout/.wh.dir-a")
    L.wh("whiteout/.wh.file-a")
    # opaque: o1 with a dir entry, marker, re-add of a and a new file; o2 marker only
    L.dir("opaque/o1", mode=0o750, mtime=T)
    L.wh("opaque/o1/.wh..wh..opq")
    L.file("opaque/o1/a", b"upper a\n", mtime=T)
    L.file("opaque/o1/n", b"new in opaque o1\n", mtime=T)
    L.wh("opaque/o2/.wh..wh..opq")
    L.file("opaque/o2/new", b"o2 new\n", mtime=T)
    # whiteouts re-added in layer 3
    L.wh("readd/.wh.d")
    L.wh("readd/.wh.f")
    # replacements
    L.file("replace/d2f", b"was a directory with a subtree\n", mtime=T)
    L.symlink("replace/d2sym", "../opaque", mtime=T)
    L.dir("replace/f2d", mode=0o751, mtime=T)
    L.file("replace/f2d/inner", b"inside the new dir\n", mtime=T)
    L.dir("replace/sym2d", mtime=T)
    L.file("replace/sym2d/file", b"sym2d is a dir now\n", mtime=T)
    # hardlinks
    L.dir("hardlinks", mtime=T)
    L.file("hardlinks/h1", b"hardlink group h\n", mode=0o640, mtime=T)
    L.link("hardlinks/h2", "hardlinks/h1", mtime=T)
    L.link("hardlinks/h3", "hardlinks/h1", mtime=T)
    L.dir("hardlinks/sub", mtime=T)
    L.link("hardlinks/sub/h4", "hardlinks/h1", mtime=T)
    L.file("hardlinks/sub/target", b"a file in a subdir\n", mtime=T)
    L.link("hardlinks/to-sub", "hardlinks/sub/target", mtime=T)
    L.file("hardlinks/t1", b"t1 old: the link keeps this\n", mtime=T)
    L.link("hardlinks/t1-link", "hardlinks/t1", mtime=T)
    L.file("hardlinks/t1", b"t1 new: overwritten later in the same layer\n", mtime=T + 1)
    L.file("hardlink-lower/b", b"b overwritten: a and c keep the old bytes\n", mtime=T)
    # xattrs
    L.dir("xattrs", mtime=T, pax={"SCHILY.xattr.user.dir": "on a directory"})
    L.file("xattrs/file", b"has xattrs\n", mtime=T, pax={
        "SCHILY.xattr.user.text": "plain text",
        "SCHILY.xattr.user.binary": binx(b"\x00\x01\x02\xfe\xff\x00end"),
        "SCHILY.xattr.user.empty": "",
        "SCHILY.xattr.security.capability": binx(bytes.fromhex("0100000200040000000000000000000000000000")),
    })
    L.file("xattrs/plain", b"no xattrs\n", mtime=T)
    # sub-second mtimes
    L.dir("subsec", pax={"mtime": "1700000100.000000007"})
    L.file("subsec/ns", b"ns\n", pax={"mtime": "1700000100.123456789"})
    L.file("subsec/us", b"us\n", pax={"mtime": "1700000100.654321"})
    L.file("subsec/old", b"old\n", pax={"mtime": "946684800.5"})
    L.symlink("subsec/link", "ns", pax={"mtime": "1700000100.999999999"})
    # owners beyond ustar's 7 octal digits
    L.dir("ids", mtime=T)
    L.file("ids/max-octal", b"2097151\n", uid=2097151, gid=2097151, mtime=T)
    L.file("ids/just-over", b"2097152\n", uid=2097152, gid=2097152, mtime=T)
    L.file("ids/big", b"3000000:4000000\n", uid=3000000, gid=4000000, mtime=T)
    L.file("ids/huge", b"4294967294\n", uid=4294967294, gid=4294967294, mtime=T)
    L.dir("ids/dir-owned", uid=1234, gid=5678, mtime=T)
    L.symlink("ids/link-owned", "big", uid=1001, gid=1002, mtime=T)
    # devices
    L.dir("devices", mtime=T)
    L.dev("devices/null", tarfile.CHRTYPE, 1, 3, 0o666, mtime=T)
    L.dev("devices/bigminor", tarfile.CHRTYPE, 259, 300, 0o600, mtime=T)
    L.dev("devices/sda", tarfile.BLKTYPE, 8, 0, 0o660, gid=6, mtime=T)
    L.fifo("devices/fifo", 0o620, mtime=T)
    # modes
    L.dir("modes", mtime=T)
    L.file("modes/setuid", b"#!/bin/sh\n", 0o4755, mtime=T)
    L.file("modes/setgid", b"#!/bin/sh\n", 0o2755, gid=50, mtime=T)
    L.file("modes/all", b"all bits\n", 0o7777, mtime=T)
    L.file("modes/none", b"no bits\n", 0o000, mtime=T)
    L.file("modes/ro", b"read only\n", 0o400, mtime=T)
    L.dir("modes/sticky", 0o1777, mtime=T)
    L.dir("modes/setgid-dir", 0o2775, gid=50, mtime=T)
    L.dir("modes/private", 0o700, mtime=T)
    # empty files
    L.dir("empty", mtime=T)
    L.file("empty/e1", b"", mtime=T)
    L.file("empty/e2", b"", mtime=T)
    # duplicates: the last entry wins
    L.dir("dup", mtime=T)
    L.file("dup/f", b"first\n", mtime=T)
    L.file("dup/f", b"second\n", mtime=T)
    L.file("dup/f", b"third and last\n", 0o600, mtime=T + 2)
    L.dir("dup/d", 0o700, mtime=T)
    L.file("dup/d/child", b"child survives a re-declared dir\n", mtime=T)
    L.dir("dup/d", 0o755, mtime=T + 3)
    L.file("dup/file-then-link", b"file\n", mtime=T)
    L.symlink("dup/file-then-link", "f", mtime=T)
    L.symlink("dup/link-then-file", "f", mtime=T)
    L.file("dup/link-then-file", b"file wins\n", mtime=T)
    # implicit parents: no entries for implicit/, implicit/a, implicit/a/b
    L.file("implicit/a/b/c", b"deep file with implicit parents\n", mtime=T)
    # UTF-8 names
    L.dir("unicode", mtime=T)
    L.file("unicode/na\u00efve-\u65e5\u672c.txt", b"utf-8 name\n", mtime=T)
    L.file("unicode/space name  x", b"spaces\n", mtime=T)
    L.close()


def layer_readd(p):
    L = Layer(p)
    T = T0 + 200
    L.file("readd/f", b"re-added f\n", mtime=T)
    L.dir("readd/d", mode=0o755, mtime=T)
    L.file("readd/d/new", b"only this is in d now\n", mtime=T)
    L.wh("hardlinks/.wh.h3")
    L.wh("whiteout/.wh.never-existed")
    L.close()


def long_names(L, top, T):
    comp255 = "n" * 251 + ".txt"                         # one 255-byte component
    comp150 = "long-name-" + "x" * 140                   # 150 bytes
    deep = top + "/" + "/".join(["d%02d-" % i + "p" * 55 for i in range(5)])  # > 300 bytes
    L.dir(top, mtime=T)
    L.file(top + "/" + comp150, b"name > 100 bytes\n", mtime=T)
    L.file(top + "/" + comp255, b"a 255-byte name\n", mtime=T)
    parts = deep.split("/")
    for i in range(2, len(parts) + 1):
        L.dir("/".join(parts[:i]), mtime=T)
    L.file(deep + "/file-in-a-deep-dir", b"path > 255 bytes\n", mtime=T)
    L.symlink(top + "/link-long-target", deep[len(top) + 1:] + "/file-in-a-deep-dir", mtime=T)
    L.link(top + "/hardlink-long-target", deep + "/file-in-a-deep-dir", mtime=T)
    L.link(deep + "/hardlink-long-name-" + "h" * 90, top + "/" + comp150, mtime=T)


def layer_gnu(p):
    L = Layer(p, tarfile.GNU_FORMAT)
    T = T0 + 300
    long_names(L, "longgnu", T)
    L.file("longgnu/base256-ids", b"uid 3000000 gid 5000000\n", uid=3000000, gid=5000000, mtime=T)
    L.close()


def layer_paxlong(p):
    L = Layer(p)
    long_names(L, "longpax", T0 + 400)
    L.close()


def layer_dirsonly(p):
    L = Layer(p)
    L.dir("dirsonly", mtime=T0 + 500)
    L.dir("dirsonly/a", mode=0o750, mtime=T0 + 501)
    L.dir("dirsonly/a/b", mode=0o700, uid=42, gid=43, mtime=T0 + 502)
    L.dir("meta", mode=0o711, mtime=T0 + 503, pax={"SCHILY.xattr.user.meta": "dir re-declared"})
    L.close()


def layer_empty(p):
    tarfile.open(p, "w", format=tarfile.PAX_FORMAT).close()


def make_sparse_stage(d, prefix):
    os.makedirs(d + "/sparse")
    f = d + "/sparse/%s-data" % prefix                  # 8 MiB: data | hole | data | hole
    with open(f, "wb") as o:
        o.truncate(8 << 20)
        o.seek(0); o.write(rnd(1, 4096))
        o.seek(1 << 20); o.write(rnd(2, 65536 + 123))
        o.seek(5 << 20); o.write(rnd(3, 4096))
    f2 = d + "/sparse/%s-allhole" % prefix              # 3 MiB, no data at all
    with open(f2, "wb") as o:
        o.truncate(3 << 20)
    f3 = d + "/sparse/%s-tail" % prefix                 # hole then data up to EOF
    with open(f3, "wb") as o:
        o.truncate(2 << 20)
        o.seek((2 << 20) - 777); o.write(rnd(4, 777))
    for x in (f, f2, f3, d + "/sparse"):
        os.utime(x, (T0 + 600, T0 + 600))


def layer_sparse(p, tmp, fmt):
    d = os.path.join(tmp, "sparse-" + fmt)
    make_sparse_stage(d, fmt)
    opts = ["--sparse", "--numeric-owner", "--owner=0", "--group=0", "--sort=name"]
    if fmt == "gnu":
        opts += ["--format=gnu"]
    else:
        opts += ["--format=pax", "--sparse-version=1.0",
                 "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"]
    cmd = ["tar", "-C", d] + opts + ["-cf", p, "sparse"]
    if fmt == "pax" and os.geteuid() == 0 and shutil.which("unshare"):
        # PAX sparse 1.0 names the entry "GNUSparseFile.<tar's PID>/name": run tar as PID 1 of
        # a new PID namespace so the layer is reproducible.
        cmd = ["unshare", "--pid", "--fork"] + cmd
    subprocess.run(cmd, check=True)


def layer_big(p):
    L = Layer(p)
    T = T0 + 700
    L.dir("big", mtime=T)
    L.file("big/random-20m", rnd(20, 20 << 20), mtime=T)
    L.file("big/random-5m", rnd(5, 5 << 20), mtime=T)
    L.file("big/zeros-8m", bytes(8 << 20), mtime=T)
    L.file("big/mixed-6m", b"".join(rnd(60 + i, 1 << 20) if i % 2 == 0 else bytes(1 << 20)
                                   for i in range(6)), mtime=T)
    L.link("big/random-20m-link", "big/random-20m", mtime=T)
    L.close()


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make-edge-images.py OUT")
    out = os.path.abspath(sys.argv[1])
    os.makedirs(out, exist_ok=True)
    import fcntl
    lock = open(os.path.join(out, ".edge.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    h = hashlib.sha256()
    for f in ("make-edge-images.py", "mkimage.py"):
        h.update(open(os.path.join(HERE, f), "rb").read())
    stamp = os.path.join(out, "edge.stamp")
    outputs = ["edge-gzip", "edge-zstd", "edge-none", "edge-mixed", "edge.oci.tar",
               "edge-docker.tar", "edge-layers"]
    if (os.path.exists(stamp) and open(stamp).read().strip() == h.hexdigest()
            and all(os.path.exists(os.path.join(out, o)) for o in outputs)):
        print("edge test images up to date in", out)
        return
    if os.path.exists(stamp):
        os.unlink(stamp)
    for o in outputs:
        p = os.path.join(out, o)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)
    ld = os.path.join(out, "edge-layers")
    tmp = os.path.join(out, ".work-edge")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(ld)
    os.makedirs(tmp)
    layers = [
        ("01-base", layer_base), ("02-changes", layer_changes), ("03-readd", layer_readd),
        ("04-gnu", layer_gnu), ("05-paxlong", layer_paxlong), ("06-dirsonly", layer_dirsonly),
        ("07-empty", layer_empty),
        ("08-sparse-gnu", lambda p: layer_sparse(p, tmp, "gnu")),
        ("09-sparse-pax", lambda p: layer_sparse(p, tmp, "pax")),
        ("10-big", layer_big),
    ]
    paths = []
    for name, fn in layers:
        p = os.path.join(ld, name + ".tar")
        fn(p)
        paths.append(p)
    shutil.rmtree(tmp, ignore_errors=True)
    mk = [sys.executable, os.path.join(HERE, "mkimage.py")]
    comments = sum((["--comment", n] for n, _ in layers), [])
    procs = [
        subprocess.Popen(mk + [os.path.join(out, "edge-gzip")] + paths + comments +
                         ["--compression", "gzip", "--oci-archive", os.path.join(out, "edge.oci.tar")]),
        subprocess.Popen(mk + [os.path.join(out, "edge-zstd")] + paths + comments + ["--compression", "zstd"]),
    ]
    subprocess.run(mk + [os.path.join(out, "edge-none")] + paths + comments +
                   ["--compression", "none", "--docker-archive", os.path.join(out, "edge-docker.tar"),
                    "--docker-name", "lazysnap-test/edge:latest"], check=True)
    mix = ["gzip-multi", "zstd-multi", "pigz", "gzip", "zstd", "none", "gzip", "zstd-multi",
           "gzip-multi", "zstd-multi"]
    subprocess.run(mk + [os.path.join(out, "edge-mixed")] + ["%s:%s" % (p, c) for p, c in zip(paths, mix)]
                   + comments + ["--chunk", "1"], check=True)
    for pr in procs:
        if pr.wait() != 0:
            sys.exit("mkimage.py failed")
    with open(stamp, "w") as f:
        f.write(h.hexdigest() + "\n")
    total = sum(os.path.getsize(p) for p in paths)
    n = sum(len(tarfile.open(p).getmembers()) for p in paths if "sparse" not in p)
    print("edge test images in %s: %d layers, %.1f MiB uncompressed, ~%d entries (+sparse)"
          % (out, len(paths), total / 1048576, n))


if __name__ == "__main__":
    main()
