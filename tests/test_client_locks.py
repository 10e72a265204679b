"""
The client core's locks across a metadata server restart: what it holds is
taken again when it reconnects, and a lock another client took meanwhile is
lost loudly (reads and writes of the file fail with EIO).

The server is a real responder answering in memory; a restart is a new
responder on the same database, every old connection dropped.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from lucidlink import errors
from lucidlink.client.filespace import Filespace, LockLost
from lucidlink.meta.locks import WHOLE_FILE_END, HeldLock
from lucidlink.meta.service import MetadataResponder
from lucidlink.protocol.messages import LockKind, LockType
from tests.client_helpers import FILESPACE, MemoryFilespaceCase

READ, WRITE, UNLOCK = LockType.READ, LockType.WRITE, LockType.UNLOCK
FLOCK, POSIX = LockKind.FLOCK, LockKind.POSIX
GRACE = 30.0


class ReclaimTests(MemoryFilespaceCase):
    """Two clients of one filespace; the metadata server restarts under them."""

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        yield super().setUp()
        self.other: Filespace = yield self.memory_filespace()
        self.clock = Clock()
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def restart(self, grace: float = GRACE, keep: tuple[Filespace, ...] = ()) -> None:
        """A new responder on the same database; the connections of every client but ``keep`` dropped."""
        old, self.responder = self.responder, MetadataResponder(
            self.meta_store, self.clock, FILESPACE, lock_grace=grace, group_window=None
        )
        kept = {fs.session._live.connection for fs in keep if fs.session._live is not None}
        for session in list(old.sessions.values()):
            if session.connection not in kept:
                session.connection.close("the metadata server restarted")

    def held_on_server(self, inode: int, kind: LockKind) -> list[tuple[LockType, int, int]]:
        return [(lock.lock_type, lock.start, lock.end) for lock in self.responder.locks.held(inode, kind)]

    def test_locks_taken_again_after_restart(self) -> None:
        """The holder reconnects at once and reclaims; the other is refused in grace and after it."""
        handle = self.now(self.fs.inodes.create(1, b"f", 0o644, os.O_RDWR))
        inode = handle.inode
        self.now(self.fs.inodes.lock(inode, 7, FLOCK, WRITE))
        self.now(self.fs.inodes.lock(inode, 8, POSIX, READ, 10, 19))
        self.restart()
        # No call of the holder's was needed: it connected again by itself.
        self.assertEqual(self.held_on_server(inode, FLOCK), [(WRITE, 0, WHOLE_FILE_END)])
        self.assertEqual(self.held_on_server(inode, POSIX), [(READ, 10, 19)])
        refused = self.failureResultOf(self.other.inodes.lock(inode, 1, POSIX, READ, 100, 200), errors.Locked)
        self.assertIn("grace period", str(refused.value))
        self.clock.advance(GRACE)
        self.failureResultOf(self.other.inodes.lock(inode, 1, FLOCK, READ), errors.Locked)
        self.failureResultOf(self.other.inodes.lock(inode, 1, POSIX, WRITE, 15, 15), errors.Locked)
        self.now(self.other.inodes.lock(inode, 1, POSIX, WRITE, 20, 30))
        self.now(handle.write(0, b"still mine"))
        self.now(handle.close())

    def test_unlocked_and_closed_are_not_reclaimed(self) -> None:
        """What was unlocked, or released by closing the file's last handle, is forgotten here too."""
        handle = self.now(self.fs.inodes.create(1, b"g", 0o644, os.O_RDWR))
        other = self.now(self.fs.inodes.create(1, b"h", 0o644, os.O_RDWR))
        self.now(self.fs.inodes.lock(handle.inode, 7, POSIX, WRITE, 0, 99))
        self.now(self.fs.inodes.lock(handle.inode, 7, POSIX, UNLOCK, 50, 99))
        self.now(self.fs.inodes.lock(other.inode, 7, FLOCK, WRITE))
        self.now(other.close())
        self.assertEqual(
            self.fs.inodes.held_locks.all_held(), [(handle.inode, POSIX, HeldLock((0, 7), WRITE, 0, 49))]
        )
        self.restart(grace=0)
        self.assertEqual(self.held_on_server(handle.inode, POSIX), [(WRITE, 0, 49)])
        self.assertEqual(self.held_on_server(other.inode, FLOCK), [])

    def test_lock_taken_meanwhile_is_lost(self) -> None:
        """Another client took the lock before the holder came back: the holder's I/O on the file fails."""
        handle = self.now(self.fs.inodes.create(1, b"lost", 0o644, os.O_RDWR))
        self.now(handle.write(0, b"before"))
        self.now(self.fs.inodes.lock(handle.inode, 7, POSIX, WRITE, 0, 9))
        self.restart(grace=0, keep=(self.fs,))  # the holder's connection to the old server lingers
        self.now(self.other.inodes.lock(handle.inode, 1, POSIX, WRITE, 5, 5))
        self.fs.session._live.connection.close("the old server's connection ends at last")
        lost = self.failureResultOf(handle.write(0, b"after"), LockLost)
        self.assertIn("bytes 0-9", str(lost.value))
        self.assertEqual(LockLost.errno_name, "EIO")
        self.failureResultOf(handle.read(0, 10), LockLost)
        self.assertEqual(self.fs.inodes.held_locks.all_held(), [])
        logged = [event for event in self.logged if event.get("log_level") == LogLevel.error]
        self.assertEqual(len(logged), 1)
        self.assertIn("was lost", formatEvent(logged[0]))
        # What was written before the loss is still committed at close; a new open works.
        self.now(handle.close())
        again = self.now(self.fs.inodes.open(handle.inode, os.O_RDONLY))
        self.assertEqual(self.now(again.read(0, 100)), b"before")
