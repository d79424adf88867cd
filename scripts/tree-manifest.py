#!/usr/bin/env python3
"""Prints a manifest of the tree at ROOT: one line per path, fields separated by tabs, for
comparing a tree that only another user can read (a FUSE mount without allow_other) with a
reference. Walks without following symlinks. Fields: path, type, mode (octal, 12 bits),
uid, gid, size (not for directories), mtime (sec.nsec), nlink and hardlink group (the first
path of the inode, not for directories), rdev (devices), symlink target and xattrs (hex),
sha256 of file contents. A path that cannot be read gets an `error=` field."""
import hashlib
import os
import stat
import sys

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
         stat.S_IFSOCK: "socket"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def xattrs(path):
    out = []
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        out.append(name + "=" + os.getxattr(path, name, follow_symlinks=False).hex())
    return ",".join(out)


def main():
    root = os.fsencode(sys.argv[1])
    entries = []
    stack = [b""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        fields = {}
        try:
            st = os.lstat(path)
        except OSError as e:
            entries.append((rel, {"error": "lstat: " + e.strerror}, None))
            continue
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "unknown")
        fields["type"] = kind
        fields["mode"] = "%04o" % stat.S_IMODE(st.st_mode)
        fields["uid"] = str(st.st_uid)
        fields["gid"] = str(st.st_gid)
        fields["mtime"] = "%d.%09d" % (st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9)
        if kind != "dir":
            fields["size"] = str(st.st_size)
            fields["nlink"] = str(st.st_nlink)
        if kind in ("chardev", "blockdev"):
            fields["rdev"] = "%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
        try:
            if kind == "symlink":
                fields["target"] = os.readlink(path).hex()
            fields["xattrs"] = xattrs(path)
            if kind == "file":
                fields["sha256"] = sha256(path)
            if kind == "dir":
                stack.extend(os.path.join(rel, n) if rel else n for n in os.listdir(path))
        except OSError as e:
            fields["error"] = e.strerror
        entries.append((rel, fields, (st.st_dev, st.st_ino) if kind != "dir" else None))
    entries.sort(key=lambda e: e[0])
    leader = {}
    for rel, _, key in entries:
        if key is not None:
            leader.setdefault(key, rel)
    out = sys.stdout.buffer
    for rel, fields, key in entries:
        if key is not None:
            fields["link"] = leader[key].hex()
        line = [b"/" + rel] + [("%s=%s" % kv).encode() for kv in sorted(fields.items())]
        out.write(b"\t".join(line) + b"\n")


if __name__ == "__main__":
    main()
