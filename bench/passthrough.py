"""
A minimal llfuse passthrough of a folder: the floor of a FUSE filesystem written in Python here.

``python bench/passthrough.py SOURCE MOUNTPOINT`` mounts SOURCE at MOUNTPOINT
(in the foreground, until unmounted or SIGINT/SIGTERM), with the options
``lucid-mount`` uses (``big_writes``, the same attribute and entry
timeouts) so that :mod:`bench.fs_bench` compares the two on the same
footing.  Every request does the least it can: one system call on the
source folder, with the llfuse lock held (they are all fast).  Inode numbers
are the source's own; paths are remembered per inode while the kernel holds
it.  Not a filesystem to use: no hard links across renames of folders, no
xattrs, no locks.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections import Counter
from typing import Any

import llfuse

ATTRIBUTE_TIMEOUT = 1.0
"""The kernel keeps attributes and entries as long as it does on ``lucid-mount``."""

MOUNT_OPTIONS = {"fsname=passthrough", "subtype=passthrough", "big_writes", "default_permissions"}
"""The options of ``lucid-mount`` (see ``lucidlink.mount.mount_options``)."""


def _errors(function: Any) -> Any:
    """Turn an ``OSError`` of the source into the same errno for the kernel."""

    def translated(*arguments: Any) -> Any:
        try:
            return function(*arguments)
        except OSError as error:
            raise llfuse.FUSEError(error.errno or errno.EIO) from None

    translated.__name__ = function.__name__
    return translated


class Passthrough(llfuse.Operations):
    """The requests of a mount carried out on a source folder."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self._paths: dict[int, str] = {llfuse.ROOT_INODE: source}
        self._lookups: Counter[int] = Counter()
        self._directories: dict[int, list[tuple[bytes, Any, int]]] = {}
        self._numbers = iter(range(1, 1 << 62))

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise llfuse.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _entry(self, path: str, status: os.stat_result | None = None) -> llfuse.EntryAttributes:
        status = status or os.lstat(path)
        inode = llfuse.ROOT_INODE if path == self._paths[llfuse.ROOT_INODE] else status.st_ino
        entry = llfuse.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = ATTRIBUTE_TIMEOUT
        entry.attr_timeout = ATTRIBUTE_TIMEOUT
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_atime_ns",
                      "st_mtime_ns", "st_ctime_ns"):
            setattr(entry, field, getattr(status, field))
        entry.st_blksize = status.st_blksize
        entry.st_blocks = status.st_blocks
        return entry

    def _remember(self, path: str) -> llfuse.EntryAttributes:
        entry = self._entry(path)
        self._paths[entry.st_ino] = path
        self._lookups[entry.st_ino] += 1
        return entry

    @_errors
    def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> llfuse.EntryAttributes:
        if name == b".":
            return self._remember(self._path(parent_inode))
        return self._remember(self._child(parent_inode, name))

    def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            self._lookups[inode] -= count
            if self._lookups[inode] <= 0:
                del self._lookups[inode]
                if inode != llfuse.ROOT_INODE:
                    self._paths.pop(inode, None)

    @_errors
    def getattr(self, inode: int, ctx: Any = None) -> llfuse.EntryAttributes:
        return self._entry(self._path(inode))

    @_errors
    def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> llfuse.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            now = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else now.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns))
        return self._entry(path)

    @_errors
    def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        entries = []
        with os.scandir(path) as scan:
            for position, item in enumerate(scan, start=1):
                entries.append((os.fsencode(item.name), self._entry(item.path, item.stat(follow_symlinks=False)),
                                position))
        number = next(self._numbers)
        self._directories[number] = entries
        return number

    def readdir(self, fh: int, off: int) -> Any:
        yield from self._directories[fh][off:]

    def releasedir(self, fh: int) -> None:
        self._directories.pop(fh, None)

    @_errors
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> llfuse.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)
        return self._remember(path)

    @_errors
    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        os.rmdir(self._child(parent_inode, name))

    @_errors
    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        os.unlink(self._child(parent_inode, name))

    @_errors
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
               ctx: Any) -> None:
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        os.rename(old, new)
        moved = os.lstat(new).st_ino
        if moved in self._paths:
            self._paths[moved] = new

    @_errors
    def statfs(self, ctx: Any) -> llfuse.StatvfsData:
        source = os.statvfs(self._paths[llfuse.ROOT_INODE])
        data = llfuse.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(source, field))
        return data

    @_errors
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: Any) -> tuple[int, llfuse.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, mode)
        return fd, self._remember(path)

    @_errors
    def open(self, inode: int, flags: int, ctx: Any) -> int:
        return os.open(self._path(inode), flags & ~os.O_APPEND)  # the kernel gives append offsets

    @_errors
    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_errors
    def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    def flush(self, fh: int) -> None:
        pass

    @_errors
    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    @_errors
    def release(self, fh: int) -> None:
        os.close(fh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the folder to show")
    parser.add_argument("mountpoint", help="where to mount it")
    args = parser.parse_args()
    if not os.path.isdir(args.source):
        parser.error(f"{args.source} is not a folder")
    operations = Passthrough(os.path.abspath(args.source))
    llfuse.init(operations, args.mountpoint, MOUNT_OPTIONS)
    try:
        llfuse.main(workers=None, handle_signals=True)
    finally:
        llfuse.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
