#!/usr/bin/env python3
"""mkimage.py — build a deterministic OCI image layout from uncompressed layer tars.

Python 3 standard library only (plus the `gzip`/`pigz`/`zstd` command-line tools).

    mkimage.py OUT_DIR LAYER.tar[:COMP] ... [options]

Each positional LAYER is an uncompressed tar; an optional ":COMP" suffix overrides the image's
compression for that layer (per-layer mixing). COMP is one of:

    gzip        `gzip -n -6`: one gzip member
    pigz        `pigz -n -6`: one gzip member made of independently flushed 128 KiB blocks
    gzip-multi  several concatenated gzip members (one per --chunk MiB of tar); a reader that
                stops after the first member sees a truncated tar
    zstd        `zstd -3 -T1`: ONE zstd frame for the whole layer (readers cannot enter it
                in the middle)
    zstd-multi  several concatenated zstd frames (one per --chunk MiB of tar)
    none        the tar itself, media type application/vnd.oci.image.layer.v1.tar

Options:
    --tag TAG              org.opencontainers.image.ref.name of the image (default: latest)
    --compression COMP     default compression of every layer (default: gzip)
    --chunk MIB            chunk size of gzip-multi / zstd-multi (default 4)
    --created RFC3339      config/history timestamp (default 2024-01-01T00:00:00Z: deterministic)
    --comment TEXT         history comment per layer, repeatable, in layer order
    --platforms P1,P2      e.g. linux/amd64,linux/arm64; more than one makes a multi-platform image:
                           index.json -> (tagged) image index blob -> one manifest per platform.
                           Default: the host's platform only (linux/amd64 on x86_64).
    --flat-index           with several platforms, list the per-platform manifests directly in
                           index.json (each with the tag annotation and a platform) instead of
                           through a nested image index blob
    --platform-layer P=TAR[:COMP]
                           an extra top layer only for platform P (repeatable); lets a test see
                           which platform was chosen
    --oci-archive FILE     also write FILE: a tar of the layout (what `skopeo copy ... oci-archive:`
                           reads)
    --docker-archive FILE  also write FILE as `docker save` (classic format: manifest.json,
                           repositories, <config-hex>.json, <layer-id>/{layer.tar,VERSION,json})
                           for the host platform; layers are stored uncompressed
    --cmd JSON             the config's Cmd (default ["/bin/sh"])
    --docker-name NAME:TAG the RepoTags entry of the docker archive (default lazysnap-test/IMG:TAG)

The layout directory is created if needed; blobs already present are reused. index.json,
oci-layout and the blobs are written to temporary names and renamed. Re-running with the same
inputs gives byte-identical output.
"""

import argparse
import hashlib
import io
import json
import os
import platform as host_platform
import shutil
import subprocess
import sys
import tarfile
import tempfile

MT_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "pigz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "gzip-multi": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "zstd-multi": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def host_plat():
    m = host_platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}.get(m, m)
    return "linux/" + arch


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def canon(obj):
    """Deterministic JSON bytes (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    def __init__(self, root):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)

    def put_bytes(self, data):
        hexd = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.blobs, hexd)
        if not os.path.exists(path):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        return "sha256:" + hexd, len(data)

    def put_file(self, src):
        """Move a finished temp file into the blob store; return (digest, size)."""
        hexd = sha256_file(src)
        path = os.path.join(self.blobs, hexd)
        size = os.path.getsize(src)
        if os.path.exists(path):
            os.unlink(src)
        else:
            os.rename(src, path)
        return "sha256:" + hexd, size

    def write_meta(self, name, data):
        path = os.path.join(self.root, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)


def run_filter(cmd, src, dst, append=False):
    with open(src, "rb") as fi, open(dst, "ab" if append else "wb") as fo:
        subprocess.run(cmd, stdin=fi, stdout=fo, check=True)


def compress(src, comp, tmpdir, chunk_mib):
    """Compress tar `src` with `comp` into a temp file in tmpdir; return its path."""
    out = os.path.join(tmpdir, "layer.%d" % os.getpid())
    if comp == "none":
        shutil.copyfile(src, out)
    elif comp == "gzip":
        run_filter(["gzip", "-n", "-6", "-c"], src, out)
    elif comp == "pigz":
        # -p 2 fixed: pigz's output does not depend on the thread count, but be explicit.
        run_filter(["pigz", "-n", "-6", "-p", "2", "-c"], src, out)
    elif comp == "zstd":
        run_filter(["zstd", "-q", "-3", "-T1", "-c"], src, out)
    elif comp in ("gzip-multi", "zstd-multi"):
        cmd = ["gzip", "-n", "-6", "-c"] if comp == "gzip-multi" else ["zstd", "-q", "-3", "-T1", "-c"]
        chunk = chunk_mib << 20
        open(out, "wb").close()
        with open(src, "rb") as f:
            first = True
            while True:
                data = f.read(chunk)
                if not data and not first:
                    break
                first = False
                r = subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True)
                with open(out, "ab") as fo:
                    fo.write(r.stdout)
                if len(data) < chunk:
                    break
    else:
        raise SystemExit("unknown compression %r" % comp)
    return out


def parse_layer_arg(arg, default_comp):
    if ":" in arg:
        p, c = arg.rsplit(":", 1)
        if c in MT_LAYER:
            return p, c
    return arg, default_comp


def build(args):
    lay = Layout(args.out)
    tmpdir = tempfile.mkdtemp(dir=args.out, prefix=".tmp-")
    try:
        layer_cache = {}  # (path, comp) -> (descriptor, diff_id, tar path)

        def add_layer(path, comp):
            key = (os.path.realpath(path), comp)
            if key not in layer_cache:
                diff_id = "sha256:" + sha256_file(path)
                c = compress(path, comp, tmpdir, args.chunk)
                digest, size = lay.put_file(c)
                desc = {"mediaType": MT_LAYER[comp], "digest": digest, "size": size}
                layer_cache[key] = (desc, diff_id, path)
            return layer_cache[key]

        common = [add_layer(*parse_layer_arg(a, args.compression)) for a in args.layers]
        plats = args.platforms.split(",") if args.platforms else [host_plat()]
        extra = {}
        for pl in args.platform_layer or []:
            p, t = pl.split("=", 1)
            extra.setdefault(p, []).append(add_layer(*parse_layer_arg(t, args.compression)))

        manifests = []  # (platform, manifest descriptor, layers)
        for p in plats:
            os_, arch = p.split("/")[:2]
            variant = p.split("/")[2] if p.count("/") >= 2 else None
            layers = common + extra.get(p, [])
            history = []
            for i, (desc, diff_id, path) in enumerate(layers):
                h = {"created": args.created,
                     "created_by": "mkimage.py layer %d: %s" % (i + 1, os.path.basename(path))}
                if args.comment and i < len(args.comment):
                    h["comment"] = args.comment[i]
                history.append(h)
            config = {
                "created": args.created,
                "architecture": arch,
                "os": os_,
                "config": {
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    "Cmd": json.loads(args.cmd),
                    "Labels": {"org.lazysnap.test.platform": p},
                },
                "rootfs": {"type": "layers", "diff_ids": [l[1] for l in layers]},
                "history": history,
            }
            if variant:
                config["variant"] = variant
            cdig, csize = lay.put_bytes(canon(config))
            manifest = {
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": cdig, "size": csize},
                "layers": [l[0] for l in layers],
            }
            mdig, msize = lay.put_bytes(canon(manifest))
            pdesc = {"architecture": arch, "os": os_}
            if variant:
                pdesc["variant"] = variant
            mdesc = {"mediaType": MT_MANIFEST, "digest": mdig, "size": msize, "platform": pdesc}
            manifests.append((p, mdesc, layers, config, cdig))

        # index.json: keep entries for other tags already in the layout, replace this tag's.
        idx_path = os.path.join(args.out, "index.json")
        entries = []
        if os.path.exists(idx_path):
            with open(idx_path) as f:
                entries = [m for m in json.load(f).get("manifests", [])
                           if m.get("annotations", {}).get(REF_NAME) != args.tag]
        ann = {REF_NAME: args.tag}
        if len(manifests) == 1:
            d = dict(manifests[0][1])
            d["annotations"] = ann
            entries.append(d)
        elif args.flat_index:
            for m in manifests:
                d = dict(m[1])
                d["annotations"] = ann
                entries.append(d)
        else:
            inner = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [m[1] for m in manifests]}
            idig, isize = lay.put_bytes(canon(inner))
            entries.append({"mediaType": MT_INDEX, "digest": idig, "size": isize, "annotations": ann})
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}
        lay.write_meta("oci-layout", canon({"imageLayoutVersion": "1.0.0"}))
        lay.write_meta("index.json", canon(index))

        if args.oci_archive:
            write_oci_archive(args.out, args.oci_archive)
        if args.docker_archive:
            hp = host_plat()
            m = next((m for m in manifests if m[0] == hp), manifests[0])
            name = args.docker_name or ("lazysnap-test/%s:%s" % (
                os.path.basename(os.path.normpath(args.out)), args.tag))
            write_docker_archive(lay, m, name, args.docker_archive, args.created)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _tarinfo(name, size=0, dir_=False):
    ti = tarfile.TarInfo(name)
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if dir_:
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
    else:
        ti.mode = 0o644
        ti.size = size
    return ti


def write_oci_archive(layout, dest):
    """A tar of the layout directory (sorted, owner 0, mtime 0), like skopeo's oci-archive."""
    tmp = dest + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for top in ("oci-layout", "index.json"):
            p = os.path.join(layout, top)
            tf.addfile(_tarinfo(top, os.path.getsize(p)), open(p, "rb"))
        tf.addfile(_tarinfo("blobs", dir_=True))
        tf.addfile(_tarinfo("blobs/sha256", dir_=True))
        bdir = os.path.join(layout, "blobs", "sha256")
        for b in sorted(os.listdir(bdir)):
            if b.endswith(".tmp"):
                continue
            p = os.path.join(bdir, b)
            with open(p, "rb") as f:
                tf.addfile(_tarinfo("blobs/sha256/" + b, os.path.getsize(p)), f)
    os.rename(tmp, dest)


def write_docker_archive(lay, m, name, dest, created):
    """`docker save` (pre-25, classic) format for one platform's manifest."""
    _, _, layers, config, cdig = m
    chex = cdig.split(":")[1]
    tmp = dest + ".tmp"
    layer_ids = []
    parent = ""
    for i, (desc, diff_id, path) in enumerate(layers):
        # docker's v1 layer ID: sha256 of the v1 json; any unique deterministic id is accepted.
        v1 = {"id": "", "created": created, "container_config": {"Cmd": None}}
        if parent:
            v1["parent"] = parent
        lid = hashlib.sha256((parent + " " + diff_id).encode()).hexdigest()
        v1["id"] = lid
        if i == len(layers) - 1:
            v1["config"] = config.get("config", {})
            v1["os"] = config["os"]
            v1["architecture"] = config["architecture"]
        layer_ids.append((lid, path, canon(v1)))
        parent = lid
    manifest = [{"Config": chex + ".json", "RepoTags": [name],
                 "Layers": [lid + "/layer.tar" for lid, _, _ in layer_ids]}]
    repo, tag = name.rsplit(":", 1)
    repositories = {repo: {tag: layer_ids[-1][0]}}
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        def add_bytes(n, data):
            tf.addfile(_tarinfo(n, len(data)), io.BytesIO(data))
        cfg = canon(config)
        assert hashlib.sha256(cfg).hexdigest() == chex
        add_bytes(chex + ".json", cfg)
        for lid, path, v1 in layer_ids:
            tf.addfile(_tarinfo(lid, dir_=True))
            add_bytes(lid + "/VERSION", b"1.0")
            add_bytes(lid + "/json", v1)
            with open(path, "rb") as f:
                tf.addfile(_tarinfo(lid + "/layer.tar", os.path.getsize(path)), f)
        add_bytes("manifest.json", canon(manifest))
        add_bytes("repositories", canon(repositories))
    os.rename(tmp, dest)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--compression", default="gzip", choices=sorted(MT_LAYER))
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--created", default="2024-01-01T00:00:00Z")
    ap.add_argument("--comment", action="append")
    ap.add_argument("--platforms")
    ap.add_argument("--flat-index", action="store_true")
    ap.add_argument("--platform-layer", action="append")
    ap.add_argument("--oci-archive")
    ap.add_argument("--docker-archive")
    ap.add_argument("--docker-name")
    ap.add_argument("--cmd", default='["/bin/sh"]')
    args = ap.parse_args()
    for a in args.layers:
        p, _ = parse_layer_arg(a, args.compression)
        if not os.path.isfile(p):
            sys.exit("mkimage.py: no such layer tar: %s" % p)
    build(args)


if __name__ == "__main__":
    main()
