#!/usr/bin/env python3
"""debian-changes-layer.py STAGE1 STAGE2 OUT.tar — layer 3 ("changes") of the Debian test image.

Written with Python's tarfile in PAX format (xattrs as SCHILY.xattr.* records, sub-second
mtimes and big uids as PAX records) on top of the two dpkg-staged layers:
STAGE1 = layer 1 "base" tree, STAGE2 = layer 2 "python" tree (content of copied files is read
from them). Entry names have no "./" prefix. Deterministic: fixed mtimes, sorted where it
doesn't matter, explicit order where it does.

What it does to the lower layers (paths without leading /):
  whiteouts      usr/bin/.wh.tac (file, layer 1), usr/bin/.wh.pygettext3.11 (file, layer 2),
                 usr/share/.wh.doc (dir with a subtree coming from layers 1 AND 2)
  opaque dir     usr/lib/python3.11/json/ + .wh..wh..opq, re-adding __init__.py, decoder.py,
                 scanner.py (same bytes as below), encoder.py (one comment line appended) and a
                 new LAZYSNAP file: json/tool.py and json/__pycache__/ disappear, `import json`
                 still works
  overwritten    etc/debian_version, etc/issue (new content)
  mode+owner     usr/bin/yes: same bytes, mode 0750, uid:gid 1000:1000
  dir re-declared var/cache: mode 0700, mtime changed, children of lower layers kept
  file -> dir    etc/issue.net becomes a directory holding README
  dir -> file    usr/share/common-licenses (a dir with a subtree) becomes a regular file
  symlinks       etc/os-release retargeted to ../usr/share/lazysnap/os-release (new file);
                 usr/bin/pdb3 retargeted to ../lib/python3.11/pdb.py
  hardlinks      usr/share/lazysnap/pair-a + pair-b (new pair, this layer);
                 usr/share/lazysnap/hl/link1 overwritten: layer 2 made hl/orig, hl/link1,
                 hl/link2 one inode (nlink 3); after this layer orig+link2 keep the old bytes
                 (nlink 2) and link1 is a new file (nlink 1)
  setuid/setgid  usr/local/bin/suid-true (04755, bytes of bin/true), var/local/shared (dir 02775
                 gid 50), var/local/sticky (dir 01777)
  xattrs         usr/local/bin/cap-true: security.capability (binary v2 caps,
                 CAP_NET_BIND_SERVICE), user.lazysnap.text, user.lazysnap.bin (bytes 00 ff ..)
  specials       opt/lazysnap/fifo, opt/lazysnap/null (char 1,3), opt/lazysnap/loop7 (block 7,7)
  sub-second     opt/lazysnap/subsec-* files with PAX mtimes like 1700000000.123456789
  big ids        opt/lazysnap/bigid uid 3000000 gid 4000000 (> 2^21: PAX only)
  empty file     opt/lazysnap/empty
"""

import io
import os
import sys
import tarfile

MTIME = 1700000000


def main():
    s1, s2, out = sys.argv[1:4]

    def read(stage, rel):
        with open(os.path.join(stage, rel), "rb") as f:
            return f.read()

    tf = tarfile.open(out + ".tmp", "w", format=tarfile.PAX_FORMAT)

    def ti(name, type_=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=MTIME, pax=None):
        t = tarfile.TarInfo(name)
        t.type = type_
        t.mode = mode
        t.uid, t.gid = uid, gid
        t.uname = t.gname = ""
        t.mtime = mtime
        if pax:
            t.pax_headers = dict(pax)
            if "mtime" in pax:  # keep the ustar field consistent with the PAX record
                t.mtime = int(float(pax["mtime"]))
        return t

    def dir_(name, mode=0o755, **kw):
        tf.addfile(ti(name, tarfile.DIRTYPE, mode, **kw))

    def file_(name, data, mode=0o644, **kw):
        t = ti(name, tarfile.REGTYPE, mode, **kw)
        t.size = len(data)
        tf.addfile(t, io.BytesIO(data))

    def wh(name):
        file_(name, b"", mode=0o600)

    def symlink(name, target, **kw):
        t = ti(name, tarfile.SYMTYPE, 0o777, **kw)
        t.linkname = target
        tf.addfile(t)

    def hardlink(name, target, **kw):
        t = ti(name, tarfile.LNKTYPE, 0o644, **kw)
        t.linkname = target
        tf.addfile(t)

    def dev(name, type_, major, minor, mode, **kw):
        t = ti(name, type_, mode, **kw)
        t.devmajor, t.devminor = major, minor
        tf.addfile(t)

    # --- etc
    dir_("etc", mtime=MTIME + 1)
    file_("etc/debian_version", b"lazysnap-test 12\n")
    file_("etc/issue", b"lazysnap test image \\n \\l\n\n", mtime=MTIME + 2)
    dir_("etc/issue.net", mode=0o755)                     # file -> dir
    file_("etc/issue.net/README", b"issue.net is a directory now\n")
    symlink("etc/os-release", "../usr/share/lazysnap/os-release")

    # --- opt/lazysnap: specials, sub-second mtimes, big ids
    dir_("opt")  # not in any lower layer: declared so the image has no implicit directories
    dir_("opt/lazysnap", mode=0o755, pax={"mtime": "1700000000.5"})
    file_("opt/lazysnap/bigid", b"owned by 3000000:4000000\n", uid=3000000, gid=4000000)
    file_("opt/lazysnap/empty", b"")
    tf.addfile(ti("opt/lazysnap/fifo", tarfile.FIFOTYPE, 0o640))
    dev("opt/lazysnap/loop7", tarfile.BLKTYPE, 7, 7, 0o660, gid=6)
    dev("opt/lazysnap/null", tarfile.CHRTYPE, 1, 3, 0o666)
    file_("opt/lazysnap/subsec-a", b"a\n", pax={"mtime": "1700000000.123456789"})
    file_("opt/lazysnap/subsec-b", b"b\n", pax={"mtime": "1700000001.000000001"})
    file_("opt/lazysnap/subsec-c", b"c\n", pax={"mtime": "1600000000.999999999"})

    # --- usr
    wh("usr/bin/.wh.pygettext3.11")                       # a layer-2 file
    wh("usr/bin/.wh.tac")                                 # a layer-1 file
    symlink("usr/bin/pdb3", "../lib/python3.11/pdb.py")   # retarget (was pdb3.11)
    file_("usr/bin/yes", read(s1, "usr/bin/yes"), mode=0o750, uid=1000, gid=1000)

    jdir = "usr/lib/python3.11/json"
    dir_(jdir, pax={"mtime": "1700000002.25"})
    wh(jdir + "/.wh..wh..opq")
    file_(jdir + "/LAZYSNAP", b"json/ was made opaque by layer 3\n")
    file_(jdir + "/__init__.py", read(s2, jdir + "/__init__.py"))
    file_(jdir + "/decoder.py", read(s2, jdir + "/decoder.py"))
    file_(jdir + "/encoder.py", read(s2, jdir + "/encoder.py") + b"# changed by lazysnap layer 3\n")
    file_(jdir + "/scanner.py", read(s2, jdir + "/scanner.py"))

    dir_("usr/local", mode=0o755)                         # not in the lower layers
    dir_("usr/local/bin", mode=0o755)
    true = read(s1, "bin/true")
    file_("usr/local/bin/cap-true", true, mode=0o755, pax={
        "SCHILY.xattr.security.capability":
            bytes.fromhex("0100000200040000000000000000000000000000").decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.lazysnap.text": "hello xattr",
        "SCHILY.xattr.user.lazysnap.bin": b"\x00\xff\x01binary\x80\x00".decode("utf-8", "surrogateescape"),
    })
    file_("usr/local/bin/suid-true", true, mode=0o4755)

    wh("usr/share/.wh.doc")                               # dir with subtree from layers 1+2
    file_("usr/share/common-licenses", b"the licenses directory was replaced by this file\n")
    file_("usr/share/lazysnap/hl/link1", b"link1 was overwritten in layer 3\n")
    file_("usr/share/lazysnap/os-release", b'PRETTY_NAME="lazysnap test"\nID=lazysnap\n')
    file_("usr/share/lazysnap/pair-a", b"a hardlink pair made in layer 3\n", mode=0o600)
    hardlink("usr/share/lazysnap/pair-b", "usr/share/lazysnap/pair-a")

    # --- var
    dir_("var/cache", mode=0o700, mtime=MTIME + 3)        # re-declared lower dir
    dir_("var/local/shared", mode=0o2775, gid=50)
    dir_("var/local/sticky", mode=0o1777)

    tf.close()
    os.rename(out + ".tmp", out)


if __name__ == "__main__":
    main()
