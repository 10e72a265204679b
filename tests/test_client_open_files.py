"""
Handles of one file on one client share one open file: each sees the
others' buffered writes, sizes and truncations at once, as descriptors of a
local file do, and a close commits what all of them wrote.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from lucidlink import errors
from tests.client_helpers import MemoryFilespaceCase

CHUNK = 128 * 1024


class SharedOpenFileTests(MemoryFilespaceCase):
    """Two or three handles of one file in one client, against a real responder in memory."""

    chunk_size = CHUNK

    def test_buffered_write_seen_by_another_handle(self) -> None:
        """A write buffered by one handle is read through a handle opened after it, and the other way."""
        first = self.now(self.fs.inodes.create(1, b"f", 0o644, os.O_RDWR))
        self.now(first.write(5, b"abc"))
        second = self.now(self.fs.inodes.open(first.inode, os.O_RDWR))
        self.assertEqual(self.now(second.read(0, 100)), b"\0" * 5 + b"abc")
        self.assertEqual(second.size, 8)
        self.now(second.write(CHUNK + 1, b"xyz"))  # into another chunk
        self.assertEqual(self.now(first.read(CHUNK, 10)), b"\0xyz")
        self.now(second.write(6, b"B"))  # the later write to the same bytes wins
        self.assertEqual(self.now(first.read(5, 3)), b"aBc")
        self.assertTrue(first.pending and second.pending)

    def test_truncation_seen_by_another_handle(self) -> None:
        """A cut through one handle cuts what the other reads."""
        first = self.now(self.fs.inodes.create(1, b"t", 0o644, os.O_RDWR))
        self.now(first.write(0, b"0123456789"))
        self.now(first.flush())
        reader = self.now(self.fs.inodes.open(first.inode, os.O_RDONLY))
        self.now(first.truncate(4))
        self.assertEqual(self.now(reader.read(0, 100)), b"0123")

    @defer.inlineCallbacks
    def test_close_commits_every_handles_writes(self) -> Generator[Deferred[Any], Any, None]:
        """Closing one writable handle commits what all wrote; another client then reads it."""
        first = self.now(self.fs.inodes.create(1, b"c", 0o644, os.O_RDWR))
        second = self.now(self.fs.inodes.open(first.inode, os.O_WRONLY))
        self.now(first.write(0, b"one "))
        self.now(second.write(4, b"two"))
        self.now(second.close())
        self.assertFalse(first.pending)
        other = yield self.memory_filespace()
        self.assertEqual(self.now(other.read_file("/c")), b"one two")
        self.now(first.close())

    def test_read_only_handle_commits_through_a_writer(self) -> None:
        """fsync through a read-only handle stores the writes others buffered (through a writable handle)."""
        writer = self.now(self.fs.inodes.create(1, b"r", 0o644, os.O_RDWR))
        reader = self.now(self.fs.inodes.open(writer.inode, os.O_RDONLY))
        self.now(writer.write(0, b"data"))
        self.now(reader.fsync())
        self.assertFalse(writer.pending)
        self.failureResultOf(reader.write(0, b"no"), errors.BadFileHandle)
        self.now(reader.close())
        self.assertEqual(self.now(writer.read(0, 10)), b"data")
        self.now(writer.close())

    def test_open_with_truncation_drops_buffered_writes(self) -> None:
        """O_TRUNC empties the file for every handle, buffered writes included."""
        first = self.now(self.fs.inodes.create(1, b"o", 0o644, os.O_RDWR))
        self.now(first.write(0, b"old"))
        self.now(first.flush())
        self.now(first.write(3, b" and buffered"))
        second = self.now(self.fs.inodes.open(first.inode, os.O_RDWR | os.O_TRUNC))
        self.assertEqual((first.size, self.now(first.read(0, 100))), (0, b""))
        self.now(second.write(0, b"new"))
        self.now(first.close())
        self.now(second.close())
        self.assertEqual(self.now(self.fs.read_file("/o")), b"new")

    def test_closed_handle_refused_others_go_on(self) -> None:
        """A closed handle is refused; the file stays open for the others."""
        first = self.now(self.fs.inodes.create(1, b"x", 0o644, os.O_RDWR))
        second = self.now(self.fs.inodes.open(first.inode, os.O_RDWR))
        self.now(first.close())
        self.failureResultOf(first.read(0, 1), errors.BadFileHandle)
        self.now(second.write(0, b"still"))
        self.assertEqual(self.now(second.read(0, 10)), b"still")
        self.now(second.close())
