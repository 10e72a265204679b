"""
The llfuse adapter without a mount: errno translation and attribute
conversion over an in-memory filespace, with a bridge that waits for
nothing (every Deferred of the in-memory core has fired already).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from lucidlink.cli import mount as cli_mount
from lucidlink.errors import ERRORS_BY_CODE, LucidError, NoSpace, NotFound, Unavailable
from tests.client_helpers import MemoryFilespaceCase

try:
    import llfuse

    from lucidlink import mount as mount_module
    from lucidlink.mount import (
        ATTRIBUTE_TIMEOUT,
        ERRNO,
        Bridge,
        FilespaceOperations,
        errno_of,
        fuse_errors,
        mount_options,
    )
except ImportError:
    llfuse = None


class SynchronousBridge(Bridge if llfuse is not None else object):  # type: ignore[misc]
    """The bridge with its crossing replaced: the in-memory core answers at once."""

    def wait(self, function: Any, *arguments: Any, **keywords: Any) -> Any:
        outcome: list[Any] = []
        defer.maybeDeferred(function, *arguments, **keywords).addBoth(outcome.append)
        result = outcome[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result

    def post(self, function: Any, *arguments: Any) -> None:
        function(*arguments)


class CountingBridge(SynchronousBridge):
    """The synchronous bridge, counting its crossings."""

    crossings = 0

    def wait(self, function: Any, *arguments: Any, **keywords: Any) -> Any:
        self.crossings += 1
        return super().wait(function, *arguments, **keywords)


class Context:
    uid = 1000
    gid = 1000
    pid = 1
    umask = 0o022


class MountAdapterTests(MemoryFilespaceCase):
    """:class:`FilespaceOperations` translates requests and errors, nothing more."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def setUp(self) -> Any:
        done = super().setUp()
        done.addCallback(lambda _: setattr(self, "ops", FilespaceOperations(self.fs.inodes, SynchronousBridge(None))))
        return done

    def fuse_errno(self, function: Any, *arguments: Any) -> int:
        with self.assertRaises(llfuse.FUSEError) as caught:
            function(*arguments)
        return caught.exception.errno  # type: ignore[no-any-return]

    def test_errno_table_is_complete(self) -> None:
        """Every error that can cross the wire has its errno here."""
        names = {cls.errno_name for cls in ERRORS_BY_CODE.values()} | {LucidError.errno_name}
        self.assertEqual(names - set(ERRNO), set())
        self.assertEqual(errno_of(LucidError("x")), errno.EIO)

    def test_failures_are_logged(self) -> None:
        """
        A failure (a full disk, servers away) is logged with what failed, once in a while; the answers a
        filesystem gives every day (ENOENT...) are not.
        """
        now = [100.0]
        self.patch(mount_module, "_monotonic", lambda: now[0])

        def failing(error: LucidError) -> int:
            with self.assertRaises(llfuse.FUSEError) as caught, fuse_errors(self.test_failures_are_logged):
                raise error
            return caught.exception.errno

        with self.assertLogs("lucidlink.mount", "WARNING") as logged:
            self.assertEqual(failing(NoSpace("no room left for the write-back journal /cache/1.journal")), errno.ENOSPC)
            self.assertEqual(failing(NoSpace("no room left for the write-back journal /cache/2.journal")), errno.ENOSPC)
            self.assertEqual(failing(NotFound("no such entry")), errno.ENOENT)
            self.assertEqual(failing(Unavailable("the metadata server did not answer")), errno.EIO)
            now[0] += 60
            failing(NoSpace("no room left for the write-back journal /cache/3.journal"))
        self.assertEqual([record.getMessage() for record in logged.records], [
            "test_failures_are_logged failed (ENOSPC): no room left for the write-back journal /cache/1.journal",
            "test_failures_are_logged failed (EIO): the metadata server did not answer",
            "test_failures_are_logged failed (ENOSPC): no room left for the write-back journal /cache/3.journal"
            " (1 more like it since)",
        ])

    def test_options(self) -> None:
        """The mount says what it is and takes big writes."""
        self.assertEqual(
            mount_options("demo"), {"fsname=lucid:demo", "subtype=lucid", "big_writes", "default_permissions"}
        )

    def test_translation(self) -> None:
        """Entries carry file type bits and short timeouts; core errors become errnos."""
        ctx = Context()
        root = llfuse.ROOT_INODE
        made = self.ops.mkdir(root, b"dir", stat.S_IFDIR | 0o750, ctx)
        self.assertEqual(made.st_mode, stat.S_IFDIR | 0o750)
        self.assertEqual((made.attr_timeout, made.entry_timeout), (ATTRIBUTE_TIMEOUT, ATTRIBUTE_TIMEOUT))
        self.assertEqual(self.ops.lookup(root, b"dir", ctx).st_ino, made.st_ino)
        self.assertEqual(self.fuse_errno(self.ops.lookup, root, b"missing", ctx), errno.ENOENT)
        self.assertEqual(self.fuse_errno(self.ops.mkdir, root, b"dir", 0o755, ctx), errno.EEXIST)

        fh, entry = self.ops.create(made.st_ino, b"f", stat.S_IFREG | 0o640, os.O_RDWR | os.O_CREAT, ctx)
        self.assertEqual(entry.st_mode, stat.S_IFREG | 0o640)
        self.assertEqual(self.ops.write(fh, 3, b"abc"), 3)
        self.assertEqual(self.ops.getattr(entry.st_ino).st_size, 6)
        self.assertEqual(self.ops.read(fh, 0, 10), b"\0\0\0abc")
        self.ops.release(fh)
        self.assertEqual(self.fuse_errno(self.ops.read, fh, 0, 1), errno.EBADF)
        self.assertEqual(self.fuse_errno(self.ops.rmdir, root, b"dir", ctx), errno.ENOTEMPTY)

        link = self.ops.symlink(root, b"s", b"dir/f", ctx)
        self.assertEqual(stat.S_IFMT(link.st_mode), stat.S_IFLNK)
        self.assertEqual(self.ops.readlink(link.st_ino, ctx), b"dir/f")
        self.assertEqual(self.fuse_errno(self.ops.getxattr, link.st_ino, b"user.none", ctx), errno.ENODATA)
        # llfuse checks XATTR_CREATE and XATTR_REPLACE itself, asking getxattr without a context.
        self.assertEqual(self.fuse_errno(self.ops.getxattr, made.st_ino, b"user.none"), errno.ENODATA)
        self.ops.setxattr(made.st_ino, b"user.some", b"value", ctx)
        self.assertEqual(self.ops.getxattr(made.st_ino, b"user.some"), b"value")

        directory = self.ops.opendir(made.st_ino, ctx)
        names = [name for name, _, _ in self.ops.readdir(directory, 0)]
        self.assertEqual(names, [b".", b"..", b"f"])
        self.assertEqual([(name, offset) for name, _, offset in self.ops.readdir(directory, 2)], [(b"f", 3)])
        self.ops.releasedir(directory)

    @defer.inlineCallbacks
    def counted_operations(self) -> Any:
        """A filespace with a chunk cache, and operations over it whose crossings are counted: (fs, bridge, ops)."""
        fs = yield self.memory_filespace(cache_dir=Path(self.mktemp()))
        self.addCleanup(fs.close)
        bridge = CountingBridge(None)
        return fs, bridge, FilespaceOperations(fs.inodes, bridge)

    @defer.inlineCallbacks
    def test_cached_reads_stay_in_llfuses_thread(self) -> Any:
        """A read the core has known and cached is answered without crossing; any other crosses."""
        fs, bridge, ops = yield self.counted_operations()
        fh, _ = ops.create(llfuse.ROOT_INODE, b"cached", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, Context())
        content = bytes(range(256)) * 1000
        self.assertEqual(ops.write(fh, 0, content), len(content))
        ops.flush(fh)
        self.assertEqual(ops.read(fh, 0, 10), content[:10])
        crossings = bridge.crossings
        self.assertEqual(ops.read(fh, 5, 100_000), content[5:100_005])
        self.assertEqual(ops.read(fh, len(content) - 3, 10), content[-3:])
        self.assertEqual(bridge.crossings, crossings, "served in the calling thread")
        ops.write(fh, 1, b"new")
        self.assertEqual(ops.read(fh, 0, 5), content[:1] + b"new" + content[4:5])
        self.assertEqual(bridge.crossings, crossings + 2, "the write and the read after it crossed")
        ops.release(fh)
        self.assertEqual(self.fuse_errno(ops.read, fh, 0, 1), errno.EBADF)

    def test_known_answers_stay_in_llfuses_thread(self) -> None:
        """What the core knows (entries, attributes, missing xattrs) and flushing nothing are answered without crossing.

        Releasing a handle with nothing to store is left to the reactor without
        waiting; one with writes to store waits for them.
        """
        bridge = CountingBridge(None)
        posted: list[tuple[Any, tuple[Any, ...]]] = []
        bridge.post = lambda function, *arguments: posted.append((function, arguments))  # type: ignore[method-assign]
        ops = FilespaceOperations(self.fs.inodes, bridge)
        ctx = Context()
        made = ops.mkdir(llfuse.ROOT_INODE, b"dir", stat.S_IFDIR | 0o755, ctx)
        fh, entry = ops.create(made.st_ino, b"f", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ctx)
        crossings = bridge.crossings
        self.assertEqual(ops.lookup(made.st_ino, b"f", ctx).st_ino, entry.st_ino)
        self.assertEqual(ops.getattr(entry.st_ino).st_mode, stat.S_IFREG | 0o644)
        self.assertEqual(ops.getattr(made.st_ino).st_ino, made.st_ino)
        self.assertEqual(self.fuse_errno(ops.lookup, made.st_ino, b"missing", ctx), errno.ENOENT)
        self.assertEqual(self.fuse_errno(ops.lookup, made.st_ino, b"a/b", ctx), errno.EINVAL)
        self.assertEqual(self.fuse_errno(ops.getxattr, entry.st_ino, b"security.capability", ctx), errno.ENODATA)
        ops.flush(fh)
        ops.release(fh)
        self.assertEqual(bridge.crossings, crossings)
        self.assertEqual(len(posted), 1)
        self.assertEqual(self.fs.inodes.open_handles()[0].inode, entry.st_ino, "closed on the reactor, later")
        function, arguments = posted.pop()
        function(*arguments)
        self.assertEqual(self.fs.inodes.open_handles(), [])

        fh = ops.open(entry.st_ino, os.O_WRONLY, ctx)
        ops.write(fh, 0, b"data")
        crossings = bridge.crossings
        ops.release(fh)
        self.assertEqual((bridge.crossings, posted), (crossings + 1, []), "the writes are stored before it returns")
        self.assertEqual(ops.getattr(entry.st_ino).st_size, 4)

    @defer.inlineCallbacks
    def test_writes_and_kept_answers_stay_in_llfuses_thread(self) -> Any:
        """Writes the core can buffer at once, and kept extended attributes, do not cross; errors keep their errno."""
        fs, bridge, ops = yield self.counted_operations()
        fh, entry = ops.create(llfuse.ROOT_INODE, b"direct", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, Context())
        self.assertEqual(ops.write(fh, 0, b"a" * 1000), 1000)
        self.assertEqual(self.fuse_errno(ops.getxattr, entry.st_ino, b"security.capability", Context()), errno.ENODATA)
        crossings = bridge.crossings
        self.assertEqual(ops.write(fh, 1000, b"b" * 1000), 1000)
        self.assertEqual(self.fuse_errno(ops.getxattr, entry.st_ino, b"security.capability", Context()), errno.ENODATA)
        self.assertEqual(bridge.crossings, crossings, "answered in the calling thread")
        self.assertEqual(ops.read(fh, 990, 20), b"a" * 10 + b"b" * 10)

        journal = fs.inodes.open_handles()[0].file._journal
        os.close(journal._descriptor)
        journal._descriptor = os.open("/dev/full", os.O_WRONLY)

        def no_room(inode: int, version: int) -> Any:
            raise NoSpace("no room left for a new write-back journal")

        fs.inodes.journals.begin = no_room  # committing to make room does not help either
        self.assertEqual(self.fuse_errno(ops.write, fh, 2000, b"c"), errno.ENOSPC)
        del fs.inodes.journals.begin
        ops.release(fh)
        self.assertEqual(self.now(fs.read_file("/direct")), b"a" * 1000 + b"b" * 1000)


class AllocatorTests(SynchronousTestCase):
    """lucid-mount asks glibc's malloc to keep freed chunk buffers for reuse."""

    def test_reuse_freed_buffers(self) -> None:
        self.assertTrue(cli_mount.reuse_freed_buffers(), "glibc takes the settings")

        def no_libc(name: str) -> None:
            raise OSError("no such library")

        self.patch(cli_mount.ctypes, "CDLL", no_libc)
        self.assertFalse(cli_mount.reuse_freed_buffers(), "elsewhere nothing is changed")


class FuseCheckTests(SynchronousTestCase):
    """``lucid-mount`` says in one line why FUSE cannot work, before it does anything else."""

    def test_no_device(self) -> None:
        """Without /dev/fuse the message names it."""
        self.patch(cli_mount, "FUSE_DEVICE", Path(self.mktemp()) / "fuse")
        with self.assertRaises(cli_mount.MountRefused) as caught:
            cli_mount.check_fuse()
        self.assertIn("FUSE is not available", str(caught.exception))
        self.assertIn("is missing", str(caught.exception))

    def test_no_llfuse(self) -> None:
        """Without llfuse the message says how to install it."""
        device = Path(self.mktemp())
        device.write_bytes(b"")
        self.patch(cli_mount, "FUSE_DEVICE", device)
        saved = sys.modules.get("llfuse")
        sys.modules["llfuse"] = None  # type: ignore[assignment]  # import raises ImportError
        self.addCleanup(lambda: sys.modules.__setitem__("llfuse", saved) if saved else sys.modules.pop("llfuse"))
        with self.assertRaises(cli_mount.MountRefused) as caught:
            cli_mount.check_fuse()
        self.assertIn("llfuse", str(caught.exception))
        self.assertIn("lucidlink[fuse]", str(caught.exception))

    def test_mountpoint_refusals(self) -> None:
        """A missing, non-directory or non-empty mount point is refused clearly."""
        base = Path(self.mktemp())
        base.mkdir()
        (base / "file").write_bytes(b"")
        (base / "full").mkdir()
        (base / "full" / "x").write_bytes(b"")
        (base / "empty").mkdir()
        for name, words in (("nowhere", "does not exist"), ("file", "not a directory"),
                            ("full", "not an empty directory")):
            with self.assertRaises(cli_mount.MountRefused) as caught:
                cli_mount.check_mountpoint(base / name)
            self.assertIn(words, str(caught.exception))
        self.assertEqual(cli_mount.check_mountpoint(base / "empty"), (base / "empty").absolute())
