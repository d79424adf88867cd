#!/usr/bin/env python3
"""ocitool.py — helpers for reference-unpack.sh (Python 3 stdlib + gzip/zstd CLIs).

  ocitool.py umoci-compat SRC TAG DST [PLATFORM]
      Write layout DST, tag TAG, holding ONE image manifest that umoci 0.4.7 can unpack and that
      gives the same root filesystem as SRC:TAG:
        * an image index (nested, or several index.json entries with the tag) is resolved to the
          manifest for PLATFORM (default: the host's, e.g. linux/amd64) — umoci calls that
          "tag is ambiguous";
        * zstd layers (umoci: "blob is not correct mediatype") are decompressed to plain tar
          blobs (media type ...layer.v1.tar; the diff_id is unchanged);
        * a layer containing GNU sparse entries (typeflag 'S', which umoci rejects: "unknown
          typeflag") is rewritten with those entries expanded to regular files of the same
          content and metadata (Python tarfile reads GNU and PAX sparse maps); the other
          entries of that layer are copied header for header through tarfile.
      Unchanged blobs are hard-linked (or copied). Prints nothing; exit 0.

  ocitool.py implicit-dirs LAYOUT TAG [PLATFORM]
      Print, one per line, the directories of the final root filesystem that no layer declares
      with an entry of its own (they exist only because a deeper path implies them); "." is the
      root itself when no layer has a "./" entry. umoci creates such directories with
      MkdirAll: mode 0755, root-owned, mtime = time of unpacking, so their mtime means nothing.
      A directory merely *implied* in an upper layer but declared in a lower one is not listed:
      it keeps the lower layer's attributes (umoci restores parent mtimes it disturbs).
      Whiteouts apply to the lower layers; the opaque marker hides the lower children.

  ocitool.py resolve LAYOUT TAG [PLATFORM]
      Print the manifest digest the tag resolves to for PLATFORM.
"""

import json
import os
import platform as host_platform
import shutil
import subprocess
import sys
import tarfile
import hashlib
import io

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"


def host_plat():
    m = host_platform.machine()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def blob_path(layout, digest):
    alg, hexd = digest.split(":", 1)
    return os.path.join(layout, "blobs", alg, hexd)


def load(layout, digest):
    with open(blob_path(layout, digest)) as f:
        return json.load(f)


def plat_match(desc, plat):
    p = desc.get("platform")
    if not p:
        return False
    s = p.get("os", "") + "/" + p.get("architecture", "")
    if p.get("variant"):
        return plat in (s, s + "/" + p["variant"])
    return s == plat


def resolve(layout, tag, plat):
    """Return the manifest descriptor TAG resolves to for platform PLAT."""
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    cands = [m for m in idx.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) == tag]
    if not cands:
        sys.exit("ocitool: tag %r not found in %s" % (tag, layout))

    def pick(descs):
        if len(descs) == 1 and descs[0].get("mediaType") not in (MT_INDEX, MT_DOCKER_LIST):
            return descs[0]
        flat = []
        for d in descs:
            if d.get("mediaType") in (MT_INDEX, MT_DOCKER_LIST):
                flat.extend(load(layout, d["digest"]).get("manifests", []))
            else:
                flat.append(d)
        for d in flat:
            if plat_match(d, plat):
                if d.get("mediaType") in (MT_INDEX, MT_DOCKER_LIST):
                    return pick([d])
                return d
        if len(flat) == 1:
            return pick(flat)
        sys.exit("ocitool: no manifest for platform %s under tag %r" % (plat, tag))

    return pick(cands)


def layer_reader(path, media_type):
    """A streaming tarfile over a layer blob (any compression), plus the process to reap."""
    if media_type.endswith("+zstd"):
        cmd = ["zstd", "-dc", "-q", path]
    elif media_type.endswith("+gzip") or media_type.endswith(".tar.gzip") or "gzip" in media_type:
        cmd = ["gzip", "-dc", path]
    else:
        cmd = ["cat", path]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    return tarfile.open(fileobj=p.stdout, mode="r|", encoding="utf-8",
                        errors="surrogateescape"), p


def has_gnu_sparse(path, media_type):
    tf, p = layer_reader(path, media_type)
    found = any(m.type == tarfile.GNUTYPE_SPARSE for m in tf)
    tf.close()
    p.stdout.close()
    p.wait()
    return found


def put_blob(dst, src_path, digest=None, link=True):
    if digest is None:
        h = hashlib.sha256()
        with open(src_path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                h.update(b)
        digest = "sha256:" + h.hexdigest()
    out = blob_path(dst, digest)
    if not os.path.exists(out):
        try:
            if not link:
                raise OSError
            os.link(src_path, out)
        except OSError:
            shutil.copyfile(src_path, out)
    return digest, os.path.getsize(out)


def put_json(dst, obj):
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob_path(dst, digest), "wb") as f:
        f.write(data)
    return digest, len(data)


def umoci_compat(src, tag, dst, plat):
    mdesc = resolve(src, tag, plat)
    manifest = load(src, mdesc["digest"])
    os.makedirs(os.path.join(dst, "blobs", "sha256"), exist_ok=True)
    tmp = os.path.join(dst, "tmp-layer.tar")
    new_layers = []
    config = load(src, manifest["config"]["digest"])
    config_changed = False
    for i, l in enumerate(manifest["layers"]):
        path = blob_path(src, l["digest"])
        mt = l["mediaType"]
        if has_gnu_sparse(path, mt):
            tf, p = layer_reader(path, mt)
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                              errors="surrogateescape") as out:
                for m in tf:
                    if m.type == tarfile.GNUTYPE_SPARSE:
                        data = tf.extractfile(m).read()
                        m.type = tarfile.REGTYPE
                        m.sparse = None
                        m.size = len(data)
                        out.addfile(m, io.BytesIO(data))
                    elif m.isreg():
                        out.addfile(m, tf.extractfile(m))
                    else:
                        out.addfile(m)
            tf.close()
            p.stdout.close()
            p.wait()
            d, s = put_blob(dst, tmp, link=False)
            os.unlink(tmp)
            new_layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s})
            config["rootfs"]["diff_ids"][i] = d   # a different tar stream now
            config_changed = True
        elif mt.endswith("+zstd"):
            with open(tmp, "wb") as o:
                subprocess.run(["zstd", "-dc", "-q", path], stdout=o, check=True)
            d, s = put_blob(dst, tmp, link=False)
            os.unlink(tmp)
            new_layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s})
        else:
            put_blob(dst, path, l["digest"])
            new_layers.append(l)
    manifest = dict(manifest)
    if config_changed:
        cd, cs = put_json(dst, config)
        manifest["config"] = dict(manifest["config"], digest=cd, size=cs)
    else:
        put_blob(dst, blob_path(src, manifest["config"]["digest"]), manifest["config"]["digest"])
    manifest["layers"] = new_layers
    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
    d, s = put_json(dst, manifest)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s,
        "annotations": {REF_NAME: tag}}]}
    with open(os.path.join(dst, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(dst, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def norm(name):
    parts = [p for p in name.split("/") if p not in ("", ".")]
    out = []
    for p in parts:
        if p == "..":
            if out:
                out.pop()
        else:
            out.append(p)
    return "/".join(out) or "."


def implicit_dirs(layout, tag, plat):
    mdesc = resolve(layout, tag, plat)
    manifest = load(layout, mdesc["digest"])
    # path -> True (explicit dir) / False (implicit dir) / None (non-directory)
    nodes = {".": False}

    def parent(p):
        return "." if "/" not in p else p.rsplit("/", 1)[0]

    def remove_tree(p, keep_self=False):
        pre = p + "/"
        for k in [k for k in nodes if k.startswith(pre) or (p == "." and k != ".")]:
            del nodes[k]
        if not keep_self and p != ".":
            nodes.pop(p, None)

    def ensure_parents(p):
        chain = []
        q = parent(p)
        while q != ".":
            chain.append(q)
            q = parent(q)
        for q in reversed(chain):
            if q not in nodes or nodes[q] is None:
                remove_tree(q)
                nodes[q] = False

    for l in manifest["layers"]:
        tf, proc = layer_reader(blob_path(layout, l["digest"]), l["mediaType"])
        for m in tf:
            p = norm(m.name)
            base = p.rsplit("/", 1)[-1]
            if base == ".wh..wh..opq":
                d = parent(p)
                ensure_parents(p)
                remove_tree(d, keep_self=True)
                continue
            if base.startswith(".wh."):
                ensure_parents(p)
                target = (parent(p) + "/" if parent(p) != "." else "") + base[4:]
                remove_tree(target)
                continue
            if p != ".":
                ensure_parents(p)
            if m.isdir():
                if p in nodes and nodes[p] is None:  # a non-dir replaced by a dir
                    remove_tree(p)
                nodes[p] = True
            else:
                if p == ".":
                    continue
                remove_tree(p)
                nodes[p] = None
        tf.close()
        proc.stdout.close()
        proc.wait()
    for k in sorted(k for k, v in nodes.items() if v is False):
        print(k)


def main():
    a = sys.argv[1:]
    if len(a) >= 4 and a[0] == "umoci-compat":
        umoci_compat(a[1], a[2], a[3], a[4] if len(a) > 4 else host_plat())
    elif len(a) >= 3 and a[0] == "implicit-dirs":
        implicit_dirs(a[1], a[2], a[3] if len(a) > 3 else host_plat())
    elif len(a) >= 3 and a[0] == "resolve":
        print(resolve(a[1], a[2], a[3] if len(a) > 3 else host_plat())["digest"])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
