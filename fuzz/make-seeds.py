#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (idempotent).

Real data, small: layer tars in every format the tar reader knows (ustar, GNU with long names
and old sparse headers, PAX with xattrs, global headers and sparse 0.1/1.0 from GNU tar),
their gzip (levels, multi-member) and zstd (levels, multi-frame, skippable frames, resume points, small
blocks) forms, and the JSON documents of an OCI layout and a docker save archive.
"""
import gzip, hashlib, io, json, os, shutil, subprocess, sys, tarfile, tempfile

here = os.path.dirname(os.path.abspath(__file__))
corpus = os.path.join(here, "corpus")


def put(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def py_tar(fmt, with_xattrs=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        def add(name, kind=tarfile.REGTYPE, data=b"", link="", pax=None):
            i = tarfile.TarInfo(name)
            i.type, i.mtime, i.mode, i.uid, i.gid = kind, 1_700_000_000, 0o644, 0, 0
            i.linkname = link
            if pax:
                i.pax_headers = pax
            i.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(i, io.BytesIO(data) if data else None)
        add("etc", tarfile.DIRTYPE)
        add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/hard", tarfile.LNKTYPE, link="etc/passwd")
        add("bin/sh", tarfile.SYMTYPE, link="/bin/busybox")
        add("usr/lib/" + "long" * (40 if fmt != tarfile.USTAR_FORMAT else 20) + "/" + "n" * 90, data=b"x" * 700)
        add("usr/.wh.old")
        add("var/.wh..wh..opq")
        add("dev/null", tarfile.CHRTYPE)
        add("run/fifo", tarfile.FIFOTYPE)
        if with_xattrs:
            add("cap", data=b"y", pax={"SCHILY.xattr.security.capability": "\x01\x00",
                                       "mtime": "1700000000.123456789"})
    return buf.getvalue()


def gnu_sparse_tars(tmp):
    out = {}
    src = os.path.join(tmp, "src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "sparse"), "wb") as f:
        f.seek(20000)
        f.write(b"data" * 300)
        f.seek(60000)
        f.write(b"end")
    with open(os.path.join(src, "small"), "wb") as f:
        f.write(b"hello\n")
    for name, args in [("gnu-sparse", ["--format=gnu"]),
                       ("pax-sparse-0.1", ["--format=posix", "--sparse-version=0.1"]),
                       ("pax-sparse-1.0", ["--format=posix", "--sparse-version=1.0"])]:
        dst = os.path.join(tmp, name + ".tar")
        r = subprocess.run(["tar", "-S", *args, "-cf", dst, "-C", src, "."],
                           capture_output=True)
        if r.returncode == 0:
            out[name] = open(dst, "rb").read()
    return out


def zstd(data, *args):
    return subprocess.run(["zstd", "-q", "-c", *args], input=data, capture_output=True,
                          check=True).stdout


def main():
    tars = {
        "ustar": py_tar(tarfile.USTAR_FORMAT),
        "gnu": py_tar(tarfile.GNU_FORMAT),
        "pax": py_tar(tarfile.PAX_FORMAT, with_xattrs=True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tars.update(gnu_sparse_tars(tmp))
    # A global PAX header (as git archive writes).
    g = io.BytesIO()
    with tarfile.open(fileobj=g, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as t:
        i = tarfile.TarInfo("a")
        i.size = 3
        t.addfile(i, io.BytesIO(b"abc"))
    tars["pax-global"] = g.getvalue()
    for name, data in tars.items():
        put("tar_index", name + ".tar", data)
    big = tars["pax"] + os.urandom(0) + bytes(range(256)) * 64
    for name, data in tars.items():
        put("gzip_reader", name + ".gz", gzip.compress(data, 6))
        put("zstd_reader", name + ".zst", zstd(data, "-3"))
    put("gzip_reader", "level1.gz", gzip.compress(big, 1))
    put("gzip_reader", "level9.gz", gzip.compress(big, 9))
    put("gzip_reader", "multi-member.gz", gzip.compress(tars["ustar"]) + gzip.compress(tars["gnu"]))
    put("gzip_reader", "empty.gz", gzip.compress(b""))
    put("gzip_reader", "stored.gz", gzip.compress(bytes(range(256)) * 40, 0))
    put("zstd_reader", "multi-frame.zst", zstd(tars["ustar"], "-1") + zstd(tars["gnu"], "-19"))
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"skip!"
    put("zstd_reader", "skippable.zst", skippable + zstd(tars["pax"]) + skippable)
    put("zstd_reader", "no-check.zst", zstd(big, "--no-check", "-1"))
    put("zstd_reader", "long.zst", zstd(bytes(20000) + big, "-1"))
    put("zstd_reader", "empty.zst", zstd(b""))
    # A 1 KiB window: resume points every 5 KiB (the pass follows tables and offsets).
    put("zstd_reader", "resume.zst", zstd(b"".join(tars.values()) + big, "-3", "--zstd=wlog=10"))
    put("zstd_reader", "resume-19.zst", zstd(b"".join(tars.values()) + big, "-19", "--zstd=wlog=10"))

    def dig(b):
        return "sha256:" + hashlib.sha256(b).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [dig(tars["ustar"]), dig(tars["gnu"])]},
                         "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}}).encode()
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": dig(b"1"), "size": 1},
              {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": dig(b"2"), "size": 2}]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": dig(config), "size": len(config)},
                           "layers": layers}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dig(manifest),
         "size": len(manifest), "platform": {"os": "linux", "architecture": "amd64"},
         "annotations": {"org.opencontainers.image.ref.name": "v1"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dig(b"m2"),
         "size": 9, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
         "annotations": {"io.containerd.image.name": "docker.io/x/y:1"}}]}).encode()
    docker = json.dumps([{"Config": "abc.json", "RepoTags": ["x:1"],
                          "Layers": ["sub/layer.tar", "../outside", "/sub/layer.tar", "./sub//layer.tar"]}]).encode()
    put("manifest_config", "index.json", index)
    put("manifest_config", "manifest+config", manifest + b"\0" + config)
    put("manifest_config", "config.json", config)
    put("manifest_config", "docker-manifest.json", docker)


if __name__ == "__main__":
    main()
