#!/usr/bin/env python3
"""make-estargz-images.py OUT — eStargz versions of test images, made by the real estargz library.

Builds tools/estargz-convert (Go, GOPATH mode over Debian's Go sources, as tests/serve.rs builds
the conformance suite: GO111MODULE=off, GOPATH=<tmp>:/usr/share/gocode, GOFLAGS empty, GOCACHE
<repo>/target/go-build-cache unless set) and runs it over images made by make-test-images.sh and
make-edge-images.py, which must exist in OUT already. estargz-convert passes every layer through
estargz.Build (github.com/containerd/stargz-snapshotter/estargz, Debian
golang-github-containerd-stargz-snapshotter-dev; gzip BestCompression, no prioritized files)
with 1 MiB chunks, and writes the layers as ...tar+gzip with the annotations eStargz tools write
(containerd.io/snapshot/stargz/toc.digest, io.containers.estargz.uncompressed-size) and the new
diff_ids in the config. Outputs in OUT (tagged "latest", index.json as mkimage.py writes it):

  debian-estargz/  from debian-gzip/ (3 layers), as is. Six files span several 1 MiB chunks:
                   bin/bash (2), libc.so.6 (2), libcrypto.so.3 (5) in layer 1; usr/bin/python3.11
                   (7), libdb-5.3.so (2), libsqlite3.so.0.8.6 (2) in layer 2.
  edge-estargz/    from edge-gzip/ (10 layers), with a preparation step first for what estargz.Build
                   cannot carry (prepare(); the rewritten layers are plain PAX tars written by
                   Python tarfile that extract to the same tree, the other blobs go in as
                   they are):
                   * sparse entries: a GNU sparse entry ('S') is refused ("unsupported input
                     tar entry 'S'") and a PAX 1.0 sparse entry is cut from the raw stream at
                     its logical size (wrong bytes; "unexpected EOF" on the last one), so
                     layers 08-sparse-gnu and 09-sparse-pax get their sparse files as regular
                     files of the same bytes and metadata (GNU.sparse.* records dropped), as
                     ocitool.py umoci-compat does for GNU sparse;
                   * a hardlink whose target name is written again later in the same layer
                     (02-changes: hardlinks/t1-link -> hardlinks/t1, then a new hardlinks/t1):
                     estargz keeps only the last entry of a name, so the link would come before
                     any hardlinks/t1 and umoci ("link: no such file or directory") and
                     lazysnap ("not an earlier non-directory entry of this layer") both refuse
                     the layer. The link becomes a regular file with the old target's bytes
                     and metadata — what extracting the original gives (nlink 1, old bytes).

What eStargz changes in a layer (estargz.Build itself, not this script): every layer gets a
".no.prefetch.landmark" regular file (1 byte, 0xf) at its root and ends with the TOC entry
"stargz.index.json" (the footer follows it); entries are re-written by Go's archive/tar (PAX
where needed, no "./" prefix changes), and a name that occurs more than once in a layer is kept
only ONCE, at the position of its last occurrence (importTar: "If it already exists, replace
it"). For edge-gzip's duplicates (dup/) that gives the same tree (the last entry wins anyway);
for the hardlink case above it would not, hence the preparation.

Reproducible: the converter runs with GOMAXPROCS=4 (estargz.Build compresses a layer in
GOMAXPROCS parts, and where the parts meet shows in the blob), so the same Go and estargz give
byte-identical blobs on any machine.

Idempotent: OUT/estargz.stamp holds the sha256 of this script, tools/estargz-convert/main.go,
the estargz library's .go files, `go version` and the source images' index.json; when it
matches and the outputs exist, nothing is done. Without go or the estargz sources the images
are not built: a warning locally, an error in CI (CI=true), like tests/common's require().
"""

import copy
import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOOL_SRC = os.path.join(REPO, "tools", "estargz-convert")
GOCODE = "/usr/share/gocode"
ESTARGZ_SRC = os.path.join(GOCODE, "src/github.com/containerd/stargz-snapshotter/estargz")
CHUNK_SIZE = 1 << 20
# (output, source image, whether the source goes through prepare() first)
IMAGES = [("debian-estargz", "debian-gzip", False), ("edge-estargz", "edge-gzip", True)]
MT_TAR = "application/vnd.oci.image.layer.v1.tar"


def in_ci():
    return os.environ.get("CI") in ("true", "1")


def blob_path(layout, digest):
    algo, hexpart = digest.split(":", 1)
    assert algo == "sha256" and len(hexpart) == 64 and "/" not in hexpart, digest
    return os.path.join(layout, "blobs", "sha256", hexpart)


def load(layout, digest):
    with open(blob_path(layout, digest), "rb") as f:
        return json.load(f)


def canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def put(layout, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob_path(layout, digest), "wb") as f:
        f.write(data)
    return digest, len(data)


def layer_tar(path, media_type):
    """A streaming tarfile over a layer blob, plus the decompressor process to reap."""
    if media_type.endswith("+zstd"):
        cmd = ["zstd", "-dc", "-q", path]
    elif "gzip" in media_type:
        cmd = ["gzip", "-dc", path]
    else:
        cmd = ["cat", path]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    return tarfile.open(fileobj=p.stdout, mode="r|", encoding="utf-8",
                        errors="surrogateescape"), p


def is_sparse(m):
    return m.type == tarfile.GNUTYPE_SPARSE or getattr(m, "sparse", None) is not None


def needs_rewrite(path, media_type):
    """What in a layer estargz.Build cannot carry: (sparse entries?, the hardlink entries whose
    target name is written again later in the same layer, by index)."""
    tf, p = layer_tar(path, media_type)
    members = [(m.name, m.type, m.linkname, is_sparse(m)) for m in tf]
    tf.close()
    p.stdout.close()
    p.wait()
    last = {}
    for i, (name, _, _, _) in enumerate(members):
        last[norm(name)] = i
    early_links = {i for i, (_, t, link, _) in enumerate(members)
                   if t == tarfile.LNKTYPE and last.get(norm(link), -1) > i}
    return any(sp for _, _, _, sp in members), early_links


def norm(name):
    return "/".join(c for c in name.split("/") if c not in ("", "."))


def rewrite_layer(path, media_type, early_links):
    """The layer as a plain PAX tar (Python tarfile), same tree once extracted: sparse entries
    become regular files of the same bytes and metadata (GNU.sparse.* records dropped); a
    hardlink in early_links (its target is overwritten later in this layer, so the link keeps
    the old inode) becomes a regular file holding the target's bytes and metadata as they are
    at that point, and further links to that old inode link to it."""
    tf, p = layer_tar(path, media_type)
    targets = set()
    keep = {}          # normalised name -> (TarInfo, bytes) of link targets, as last written
    moved = {}         # normalised old-target name -> the name its old inode lives on as
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as out:
        members = []
        for m in tf:
            data = tf.extractfile(m).read() if m.isreg() or is_sparse(m) else None
            members.append((m, data))
        for i, (m, _) in enumerate(members):
            if i in early_links:
                targets.add(norm(m.linkname))
        for i, (m, data) in enumerate(members):
            n = norm(m.name)
            moved.pop(n, None)  # a new entry on this name: links now mean the new inode
            if is_sparse(m):
                m.type = tarfile.REGTYPE
                m.sparse = None
                m.size = len(data)
                m.pax_headers = {k: v for k, v in m.pax_headers.items()
                                 if not k.startswith("GNU.sparse.")}
            if i in early_links:
                t = norm(m.linkname)
                if t in moved:
                    m.linkname = moved[t]
                    out.addfile(m)
                else:
                    ti, tdata = keep[t]
                    ti = copy.copy(ti)
                    ti.name = m.name
                    ti.pax_headers = {k: v for k, v in ti.pax_headers.items() if k != "path"}
                    out.addfile(ti, io.BytesIO(tdata))
                    moved[t] = m.name
                continue
            if m.type == tarfile.LNKTYPE and norm(m.linkname) in moved:
                m.linkname = moved[norm(m.linkname)]
            if n in targets and data is not None:
                keep[n] = (copy.copy(m), data)
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    tf.close()
    p.stdout.close()
    if p.wait() != 0:
        sys.exit("decompressing %s failed" % path)
    return buf.getvalue()


def prepare(src, dst):
    """Layout dst = layout src (tag latest) with the layers estargz cannot carry rewritten
    (rewrite_layer) as plain tars; other layer blobs are hard-linked. The config's diff_ids
    follow; index.json keeps the source's manifest descriptor fields (platform, annotations).
    Prints what was rewritten."""
    os.makedirs(os.path.join(dst, "blobs", "sha256"))
    index = json.load(open(os.path.join(src, "index.json")))
    (mdesc,) = [d for d in index["manifests"]
                if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest"]
    manifest = load(src, mdesc["digest"])
    config = load(src, manifest["config"]["digest"])
    layers = []
    for i, l in enumerate(manifest["layers"]):
        path = blob_path(src, l["digest"])
        sparse, early_links = needs_rewrite(path, l["mediaType"])
        if not sparse and not early_links:
            try:
                os.link(path, blob_path(dst, l["digest"]))
            except OSError:
                shutil.copyfile(path, blob_path(dst, l["digest"]))
            layers.append(l)
            continue
        print("%s layer %d: rewritten before estargz (%s)" % (
            os.path.basename(src), i + 1, ", ".join(
                (["sparse entries expanded"] if sparse else []) +
                (["%d hardlink(s) to a name overwritten later made regular" % len(early_links)]
                 if early_links else []))), file=sys.stderr)
        d, s = put(dst, rewrite_layer(path, l["mediaType"], early_links))
        layers.append({"mediaType": MT_TAR, "digest": d, "size": s})
        config["rootfs"]["diff_ids"][i] = d
    cd, cs = put(dst, canon(config))
    manifest = dict(manifest, layers=layers, config=dict(manifest["config"], digest=cd, size=cs))
    md, ms = put(dst, canon(manifest))
    index["manifests"] = [dict(mdesc, digest=md, size=ms)]
    with open(os.path.join(dst, "index.json"), "wb") as f:
        f.write(canon(index))
    with open(os.path.join(dst, "oci-layout"), "wb") as f:
        f.write(canon({"imageLayoutVersion": "1.0.0"}))


def stamp_hash(out, go_version):
    h = hashlib.sha256()
    h.update(open(os.path.abspath(__file__), "rb").read())
    for f in sorted(glob.glob(os.path.join(TOOL_SRC, "*.go"))):
        h.update(open(f, "rb").read())
    for f in sorted(glob.glob(os.path.join(ESTARGZ_SRC, "*.go"))):
        if not f.endswith("_test.go"):
            h.update(open(f, "rb").read())
    h.update(go_version.encode())
    for _, src, _ in IMAGES:
        h.update(open(os.path.join(out, src, "index.json"), "rb").read())
    return h.hexdigest()


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make-estargz-images.py OUT")
    out = os.path.abspath(sys.argv[1])
    missing = []
    if not shutil.which("go"):
        missing.append("go (Debian golang-go)")
    if not os.path.isdir(ESTARGZ_SRC):
        missing.append("the estargz Go sources (Debian golang-github-containerd-stargz-snapshotter-dev)")
    for _, src, _ in IMAGES:
        if not os.path.exists(os.path.join(out, src, "index.json")):
            sys.exit("make-estargz-images.py: %s/%s missing: run make-test-images.sh and "
                     "make-edge-images.py first" % (out, src))
    if missing:
        msg = "eStargz test images not built, missing: %s (scripts/install-deps.sh)" % ", ".join(missing)
        if in_ci():
            sys.exit("make-estargz-images.py: " + msg)
        print("WARNING: " + msg, file=sys.stderr)
        return
    lock = open(os.path.join(out, ".estargz.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    go_version = subprocess.run(["go", "version"], check=True, capture_output=True,
                                text=True).stdout
    h = stamp_hash(out, go_version)
    stamp = os.path.join(out, "estargz.stamp")
    if (os.path.exists(stamp) and open(stamp).read().strip() == h
            and all(os.path.exists(os.path.join(out, o)) for o, _, _ in IMAGES)):
        print("estargz test images up to date in", out)
        return
    if os.path.exists(stamp):
        os.unlink(stamp)
    start = time.time()
    work = os.path.join(out, ".work-estargz")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    gopath = os.path.join(work, "gopath")
    os.makedirs(gopath)
    env = dict(os.environ, GO111MODULE="off", GOPATH=gopath + ":" + GOCODE, GOFLAGS="",
               GOCACHE=os.environ.get("GOCACHE") or os.path.join(REPO, "target", "go-build-cache"))
    tool = os.path.join(work, "estargz-convert")
    subprocess.run(["go", "build", "-o", tool, "."], cwd=TOOL_SRC, env=env, check=True)

    procs = []
    for dst, src, prep in IMAGES:
        src = os.path.join(out, src)
        if prep:
            prepared = os.path.join(work, dst + "-src")
            prepare(src, prepared)
            src = prepared
        log = open(os.path.join(work, dst + ".log"), "w+")
        cmd = [tool, src, os.path.join(out, dst), "--chunk-size", str(CHUNK_SIZE)]
        # estargz.Build cuts a layer into GOMAXPROCS parts compressed in parallel, and the
        # part boundaries show in the blob: a fixed value makes the blobs the same everywhere.
        procs.append((dst, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                 env=dict(os.environ, GOMAXPROCS="4"))))
    failed = False
    for dst, log, p in procs:
        rc = p.wait()
        log.seek(0)
        if rc != 0:
            print("estargz-convert for %s failed (exit %d):\n%s" % (dst, rc, log.read()),
                  file=sys.stderr)
            failed = True
    if failed:
        sys.exit(1)
    shutil.rmtree(work)
    with open(stamp, "w") as f:
        f.write(h + "\n")

    def size(d):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    print("estargz test images in %s: %s, built in %.0fs" % (out, ", ".join(
        "%s %.1f MiB" % (o, size(os.path.join(out, o)) / 1048576) for o, _, _ in IMAGES),
        time.time() - start))


if __name__ == "__main__":
    main()
