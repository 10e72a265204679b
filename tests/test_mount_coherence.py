"""
The adapter's own bookkeeping, without a mount: descriptors of one file see
each other's writes (as on a local filesystem), and the kernel's lookup
counts decide which inodes a reconnect invalidates.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from tests.client_helpers import MemoryFilespaceCase
from tests.test_mount import Context, SynchronousBridge

try:
    import llfuse

    from lucidlink.mount import FilespaceOperations
except ImportError:
    llfuse = None


class AdapterCoherenceTests(MemoryFilespaceCase):
    """:class:`FilespaceOperations` over an in-memory filespace."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def setUp(self) -> Any:
        done = super().setUp()
        done.addCallback(lambda _: setattr(self, "ops", FilespaceOperations(self.fs.inodes, SynchronousBridge(None))))
        return done

    def test_descriptors_see_each_others_writes(self) -> None:
        """A write through one descriptor is read through another at once; of two writes, the later wins."""
        ctx = Context()
        first, entry = self.ops.create(llfuse.ROOT_INODE, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, ctx)
        second = self.ops.open(entry.st_ino, os.O_RDWR, ctx)
        self.ops.write(first, 5, b"abc")
        self.assertEqual(self.ops.read(second, 0, 100), b"\0\0\0\0\0abc")
        self.ops.write(second, 0, b"XY")
        self.ops.write(first, 1, b"1")  # after the second's write of the same byte: this one must win
        self.assertEqual(self.ops.read(second, 0, 100), b"X1\0\0\0abc")
        self.ops.release(second)
        self.ops.release(first)
        third = self.ops.open(entry.st_ino, os.O_RDONLY, ctx)
        self.assertEqual(self.ops.read(third, 0, 100), b"X1\0\0\0abc")
        self.ops.release(third)

    def test_lookup_counts(self) -> None:
        """An inode stays known to the kernel until ``forget`` takes back every lookup of it."""
        ctx = Context()
        made = self.ops.mkdir(llfuse.ROOT_INODE, b"d", stat.S_IFDIR | 0o755, ctx)
        self.ops.lookup(llfuse.ROOT_INODE, b"d", ctx)
        known = self.ops.kernel._known
        self.assertIn(made.st_ino, known())
        self.ops.forget([(made.st_ino, 1)])
        self.assertIn(made.st_ino, known())
        self.ops.forget([(made.st_ino, 1)])
        self.assertNotIn(made.st_ino, known())
        self.assertTrue(self.ops.kernel.settle())  # not running (not mounted): nothing to wait for
